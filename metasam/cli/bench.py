"""``metasam bench``: algorithms × settings × seeds, grids chosen on validation, controls, intervals over seeds and
paired differences; OUT/results.md, results.json and results.png. Shares its run flags with ``metasam train``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from metasam.cli.flags import NON_TRANSDUCTIVE_HELP, add, add_run_flags, rule_flags_given, settings_given
from metasam.errors import ConfigError
from metasam.meta import PRESETS
from metasam.train.bench import BenchPlan, load_plan, merge, parse_seeds, parse_settings, parse_shard, run_bench, run_worker
from metasam.train.bench.export import export_evidence
from metasam.train.bench.report import render_markdown
from metasam.train.bench.results import cell_states
from metasam.train.distributed import main_process

GRID_AXES = ("algo", "ways", "shots", "seed")
"""The settings of ``metasam train`` that are the bench's axes (--algos, --settings, --seeds) instead of flags."""
REPORT = ("controls", "reference", "episodes", "test_seed")
"""The flags that change what is tested and reported, not what is trained (--merge takes them)."""
DEFAULTS: dict[str, object] = {}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="train + evaluate algorithms × settings × seeds, with grids chosen on validation",
        description="Every cell is a normal, resumable run folder OUT/<ways>w<shots>s/<algo>[/<grid point>]/seed<s>. Each "
        "algorithm's grid point is chosen on validation accuracy only (best mean over seeds); only the chosen points "
        "and their controls are tested (every run with --test-on-finish), all on one fixed test TaskSet. "
        "OUT/results.md holds the table (mean over seeds ± 95 % t-interval, paired differences to --reference), "
        "results.json the numbers, results.png the plot. "
        "Run settings apply to every algorithm that takes them; unset ones take each setting's standard values.")
    add(p, "--algos", default="maml,sharp-maml-low,agnostic-sam", help=f"comma list of {', '.join(PRESETS)}")
    add(p, "--settings", default="5w1s,5w5s", help="comma list of <ways>w<shots>s, like 5w1s,5w5s,20w1s,20w5s")
    add(p, "--seeds", default="0", help="comma list of seeds: every cell is trained once with each")
    add(p, "--grid", action="append", metavar="ALGO:KEY=V1,V2",
        help="values of a setting for one algorithm, chosen on validation (repeat for more settings: their product), "
        "e.g. sharp-maml-low:inner_rho=0.005,0.01; a tied setting takes KEY=OTHER*NUMBER or KEY=OTHER/NUMBER of "
        "another setting of the grid, e.g. agnostic-sam:inner_rho2=rho1/2. KEY: any run or rule setting but the "
        "data (dataset, data root, splits, val_tasks), the machine (device, task_threads) and the bench's axes")
    add(p, "--controls", action="store_true",
        help="add the controls of the selected points: sharp-maml-low at ρ = ρ1 − ρ2 of agnostic-sam's, agnostic-sam "
        "with β = 0, and each method whose inner rule is not gd adapted at test by the other --test-rule (the same "
        "weights)")
    add(p, "--reference", default="maml", help="the method the paired differences are taken to (one of --algos)")
    add(p, "--episodes", type=int, default=600, help="test tasks (the same for every method and seed)")
    add(p, "--test-seed", type=int, default=1234, help="seed of the fixed test TaskSet")
    add(p, "--test-on-finish", action="store_true",
        help="test each run as soon as it finishes (best.pt on the fixed test TaskSet, by each test rule a control "
        "could need), so that the bench keeps its evidence when its checkpoints (*.pt) are deleted; the choice still "
        "reads validation accuracy only, and the table then lists every grid point's test accuracy too")
    add(p, "--non-transductive", action="store_true",
        help=f"at test, {NON_TRANSDUCTIVE_HELP}; validation during training, and so the choice of best.pt, is unchanged")
    add(p, "--out", required=True, help="folder of the bench: its cells, bench.json (the plan) and the results")
    add(p, "--shard", metavar="I/N", help="train only the cells of index I modulo N (run I = 0 … N−1 as N processes, "
        "then --merge); no results are written")
    add(p, "--worker", action="store_true",
        help="train, as one of any number of processes started with the same command, the next cell no other "
        "process is training, the controls once their grid is finished, and wait while the only cells left are "
        "trained by others (unlike --shard, the cells are shared as they go, however long each takes); then --merge; "
        "no results are written")
    add(p, "--merge", action="store_true",
        help="train nothing: test and write the results of the bench in --out from its finished cells (its plan "
        "from OUT/bench.json); refuses, naming them, while cells are unfinished")
    add(p, "--status", action="store_true",
        help="train and test nothing: print where each cell of the bench in --out stands, one tab-separated line "
        "per cell (cell; state: not started, training (a process holds it now), unfinished, diverged (stopped on a NaN or "
        "Inf step: not trained again), finished or tested; last "
        "iteration; best validation accuracy), the controls once their grid is finished; a count on stderr")
    add(p, "--export", metavar="DEST",
        help="train and test nothing: copy the evidence of the bench in --out to DEST, a folder that keeps it: "
        "bench.json and, of each finished run (and tested, with --test-on-finish) and each diverged run, its files but "
        "last.pt, best.pt and "
        "val_tasks.json; a file already in DEST must hold the same bytes (nothing is "
        "overwritten); then metasam bench --out DEST --merge gives the same table")
    add(p, "--no-progress", action="store_true", help="no progress bars")
    add_run_flags(p, leave_out=GRID_AXES)
    DEFAULTS.update(vars(p.parse_args(["--out", "x"])))


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.status:
        _print_status(args)
        return 0
    if args.export:
        _export(args)
        return 0
    if args.merge:
        results = merge(_stored_plan(args), args.out, progress)
    elif args.worker:
        if args.shard:
            raise ConfigError("--worker and --shard are two ways to share the cells between processes; give one")
        cells = run_worker(plan_of(args), args.out, progress)
        diverged = f" ({len(cells['diverged'])} of them diverged, named above)" if cells["diverged"] else ""
        print(f"metasam bench: this worker trained {len(cells['trained'])} cell(s){diverged} and no cell is left to "
              f"train; then: metasam bench --out {args.out} --merge", file=sys.stderr)
        return 0
    else:
        shard = parse_shard(args.shard) if args.shard else None
        results = run_bench(plan_of(args), args.out, shard, progress)
        if shard is not None:
            _shard_done(args, results)
            return 0
    if main_process():  # under torchrun, rank 0 reports for all processes
        print(render_markdown(results))
    return 0


def plan_of(args: argparse.Namespace) -> BenchPlan:
    """The bench the flags describe (checked: see :class:`~metasam.train.bench.BenchPlan`)."""
    return BenchPlan(
        settings=parse_settings(args.settings), algos=[a.strip() for a in args.algos.split(",") if a.strip()],
        seeds=parse_seeds(args.seeds), grids=args.grid or [], overrides=settings_given(args), rules=rule_flags_given(args),
        controls=args.controls, reference=args.reference, episodes=args.episodes, test_seed=args.test_seed,
        test_on_finish=args.test_on_finish, transductive=not args.non_transductive)


def _print_status(args: argparse.Namespace) -> None:
    states = cell_states(_stored_plan(args), Path(args.out))
    print("cell\tstate\titeration\tbest_val_acc")
    for s in states:
        print("\t".join(str(v) if v is not None else "-" for v in (s["cell"], s["state"], s["iteration"], s["best_val_acc"])))
    done = sum(s["state"] in ("finished", "tested") for s in states)
    tested = sum(s["state"] == "tested" for s in states)
    diverged = sum(s["state"] == "diverged" for s in states)
    print(f"metasam bench: {done} of {len(states)} cells finished, {tested} of them tested"
          f"{f'; {diverged} diverged' if diverged else ''}; controls are listed once their grid is finished",
          file=sys.stderr)


def _stored_plan(args: argparse.Namespace) -> BenchPlan:
    """The plan of OUT/bench.json, with the report flags given; other flags are refused."""
    fixed = ("out", "merge", "status", "export", "no_progress", "command", *REPORT)
    chosen = [f"--{k}" for k in ("merge", "status", "export") if getattr(args, k)]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are different commands; give one")
    given = [k for k, v in vars(args).items() if k in DEFAULTS and k not in fixed and v != DEFAULTS[k]]
    if given:
        raise ConfigError(f"--merge, --status and --export read the bench whose plan is in {args.out}/bench.json; drop "
                          f"{', '.join('--' + k.replace('_', '-') for k in given)} (only --controls, --reference, --episodes "
                          "and --test-seed may change what is tested)")
    report = {k: getattr(args, k) for k in REPORT if getattr(args, k) != DEFAULTS[k]}
    if report and args.export:
        raise ConfigError(f"--export copies the bench as its plan in {args.out}/bench.json stands; drop "
                          f"{', '.join('--' + k.replace('_', '-') for k in report)}")
    return dataclasses.replace(load_plan(args.out), **report)


def _export(args: argparse.Namespace) -> None:
    plan = _stored_plan(args)
    cells = export_evidence(plan, args.out, args.export)
    untested = cells["untested"]
    diverged = f" and {len(cells['diverged'])} diverged run(s)" if cells["diverged"] else ""
    finished = len(cells["copied"]) - len(cells["diverged"])
    print(f"metasam bench: {finished} finished run(s){diverged} of {args.out} are in {args.export}, with bench.json "
          f"(not their checkpoints); {len(cells['unfinished'])} not finished, not copied", file=sys.stderr)
    if cells["busy"]:
        print(f"metasam bench: {len(cells['busy'])} finished run(s) in use by another process were not copied (e.g. "
              f"{cells['busy'][0].folder}): export again once it is done", file=sys.stderr)
    if cells["stale"]:
        print(f"metasam bench: {len(cells['stale'])} evaluation(s) older than the checkpoint they evaluate were not "
              f"copied (e.g. {cells['stale'][0]}): a merge of {args.out} evaluates again what its table needs",
              file=sys.stderr)
    if untested and plan.test_on_finish:  # an untested run was not copied: its test is to come
        print(f"metasam bench: {len(untested)} finished run(s) are not tested yet and were not copied (e.g. "
              f"{untested[0].folder}): the bench tests each as it goes (rerun its command if it stopped); then export "
              "again", file=sys.stderr)
    elif untested:
        print(f"metasam bench: {len(untested)} of them were not tested (e.g. {untested[0].folder}), and cannot be "
              f"from {args.export}: a merge of {args.out} first tests what its table needs, a rerun of the bench's "
              "command with --test-on-finish tests every run; then export again", file=sys.stderr)
    print(f"metasam bench: the table from the copy: metasam bench --out {args.export} --merge", file=sys.stderr)


def _shard_done(args: argparse.Namespace, status: dict) -> None:
    trained = len(status["trained"])
    print(f"metasam bench: shard {args.shard} trained {trained} cell(s)", file=sys.stderr)
    if status["waiting"]:
        print(f"metasam bench: the controls wait for the selection, which needs {len(status['waiting'])} more finished "
              f"grid cell(s) (e.g. {status['waiting'][0].folder}) from the other shards; rerun this command when they are "
              "done to train this shard's controls", file=sys.stderr)
    print(f"metasam bench: when every shard is done: metasam bench --out {args.out} --merge", file=sys.stderr)
