"""Inject each algorithmic bug the reference tests are about, one at a time, and show which tests fail.

    python tests/mutants.py            # every mutant
    python tests/mutants.py beta-flip  # one

Each mutant replaces one exact piece of source text (the run stops if the text is gone, so a mutant cannot
silently rot), runs the tests named with it, and restores the file whatever happens. A mutant that no test
catches makes the run exit 1. Not collected by pytest (the name does not start with test_): it edits the
package's files, so run it by hand on a clean tree, with nothing else running.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ["tests/meta/test_reference_gradients.py", "tests/test_optim_reference.py"]
META_SGD = ("tests/meta/test_meta_sgd.py",)
META_SGD_RUN = ("tests/train/test_meta_training.py::test_a_meta_sgd_run_keeps_its_learned_step_sizes_through_load_evaluate_and_bench",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...] = tuple(REFERENCE)


MUTANTS = [
    Mutant("beta-flip", "metasam/core/perturbation.py",
           "beta * m + (1.0 - beta) * g for m, g", "(1.0 - beta) * m + beta * g for m, g"),
    Mutant("inner-momentum-frozen", "metasam/meta/functional.py",
           "d, state, _ = inner.rule.direction(grad_s, base, state, grad_v)",
           "d, new_state, _ = inner.rule.direction(grad_s, base, state, grad_v)\n"
           "        state = new_state if state is None else state"),
    Mutant("outer-momentum-not-carried", "metasam/meta/learner.py",
           "self.outer_momentum = None if state is None else [m.detach() for m in state]",
           "self.outer_momentum = None"),
    Mutant("first-order-ignored-on-vmap", "metasam/meta/functional.py",
           "base = [p.detach() for p in phi] if inner.first_order else phi",
           "base = [p.detach() for p in phi] if inner.first_order and grad_of is not grad else phi"),
    Mutant("asam-norm-per-tensor", "metasam/core/perturbation.py",
           "return [coef * t * tg for t, tg in zip(scales, scaled)]",
           "return [rho / (torch.linalg.vector_norm(tg) + EPS) * t * tg for t, tg in zip(scales, scaled)]"),
    Mutant("sam-norm-per-tensor", "metasam/core/perturbation.py",
           "return [coef * g for g in grads]",
           "return [rho / (torch.linalg.vector_norm(g) + EPS) * g for g in grads]"),
    Mutant("agnostic-descent-sign", "metasam/core/perturbation.py",
           "return [a - d for a, d in zip(ascent, descent)]", "return [a + d for a, d in zip(ascent, descent)]"),
    Mutant("asam-scale-not-squared", "metasam/core/perturbation.py",
           "return [coef * t * tg for t, tg in zip(scales, scaled)]", "return [coef * tg for t, tg in zip(scales, scaled)]"),
    Mutant("asam-weights-scope-ignored", "metasam/optim/base.py",
           'return None if self._scaled_of is None else [self._scaled_of[p] for p in params]', "return None"),
    Mutant("detach-keeps-asam-scale", "metasam/meta/rules.py",
           "at, g_s, m = _detached(at), _detached(g_s), _detached(m)", "g_s, m = _detached(g_s), _detached(m)"),
    Mutant("detach-ignored", "metasam/meta/rules.py",
           "params, grads = _detached(params), _detached(grads)", "pass"),
    Mutant("val-view-ignored", "metasam/meta/functional.py",
           'if inner.val_view is not None and inner.rule.name == "agnostic":', "if False:"),
    Mutant("optimizer-momentum-reset-when-params-change", "metasam/optim/agnostic_sam.py",
           "self.momentum.update(self._pending_momentum)", "self.momentum = dict(self._pending_momentum)"),
    Mutant("optimizer-momentum-stored-before-check", "metasam/optim/agnostic_sam.py",
           "        self._check_finite(norm, \"training\")\n        self._check_finite(val_norm, \"validation\")\n"
           "        momentum = momentum_update([self.momentum.get(p) for p in params], val, self.beta)\n"
           "        self._pending_momentum = dict(zip(params, momentum))\n",
           "        momentum = momentum_update([self.momentum.get(p) for p in params], val, self.beta)\n"
           "        self.momentum.update(zip(params, momentum))\n"
           "        self._check_finite(norm, \"training\")\n        self._check_finite(val_norm, \"validation\")\n"),
    Mutant("optimizer-momentum-committed-before-second-step", "metasam/optim/agnostic_sam.py",
           "        self._pending_momentum = dict(zip(params, momentum))\n",
           "        self._pending_momentum = dict(zip(params, momentum))\n"
           "        self.momentum.update(self._pending_momentum)\n"),
    Mutant("supervised-alignment-before-after-swapped", "metasam/train/supervised.py",
           '{"step": step, "cos_before": cos_before, "cos_after": gradient_cosine(model, train_loss, val_loss)}',
           '{"step": step, "cos_after": cos_before, "cos_before": gradient_cosine(model, train_loss, val_loss)}',
           ("tests/analysis/test_alignment.py",)),
    Mutant("inner-alignment-before-after-swapped", "metasam/meta/learner.py",
           "mean_before, mean_after = self._task_mean", "mean_after, mean_before = self._task_mean"),
    Mutant("outer-alignment-after-taken-before-the-step", "metasam/meta/learner.py",
           "out.update(aligned, outer_cos_after=self.outer_alignment(batch, val_batch))",
           "out.update(aligned, outer_cos_after=aligned['outer_cos_before'])"),
    Mutant("val-batches-not-advanced", "metasam/optim/agnostic_sam.py",
           "batch = next(self._val_iterator) if self._val_iterator is not None else None", "batch = None",
           ("tests/test_optim.py",)),
    Mutant("adapt-selection-ignored", "metasam/meta/learner.py",
           "adapted = None if adapt is None else tuple(adapted_names(model, self.names, adapt))", "adapted = None",
           ("tests/meta/test_library.py",)),
    Mutant("anil-first-order-sees-the-body-with-its-graph", "metasam/meta/functional.py",
           "fixed = {n: t.detach() for n, t in params.items()} if inner.first_order else dict(params)",
           "fixed = dict(params)", ("tests/meta/test_library.py",)),
    Mutant("meta-sgd-step-size-ignored", "metasam/meta/functional.py",
           "step_size = [params.get(learned_lr_key(n), inner.inner_lr) for n in names]",
           "step_size = [inner.inner_lr for n in names]", META_SGD),
    Mutant("meta-sgd-step-size-detached-in-first-order", "metasam/meta/functional.py",
           "step_size = [params.get(learned_lr_key(n), inner.inner_lr) for n in names]",
           "step_size = [fixed.get(learned_lr_key(n), inner.inner_lr) for n in names]", META_SGD),
    Mutant("meta-sgd-step-size-not-an-outer-parameter", "metasam/meta/learner.py",
           'groups.append({"params": list(self.inner_lrs.values()), "weight_decay": 0.0})', "pass", META_SGD),
    Mutant("meta-sgd-step-size-unused-at-test", "metasam/meta/adapter.py",
           "phi = adapt(self.model, self._with_inner_lrs(params or self.params)",
           "phi = adapt(self.model, dict(params or self.params)", META_SGD),
    Mutant("meta-sgd-step-size-not-saved", "metasam/meta/learner_state.py",
           '"inner_lrs": {n: a.detach().clone() for n, a in learner.inner_lrs.items()} if learner.inner_lrs else None,',
           '"inner_lrs": None,', META_SGD),
    Mutant("meta-sgd-step-size-not-loaded", "metasam/meta/learner_state.py",
           "learner.inner_lrs[n].copy_(a)", "learner.inner_lrs[n].copy_(learner.inner_lrs[n])", META_SGD),
    Mutant("meta-sgd-not-recorded-for-load", "metasam/meta/learner_state.py",
           '"learn_inner_lr": bool(learner.inner_lrs),', '"learn_inner_lr": False,', META_SGD_RUN),
    Mutant("meta-sgd-step-sizes-not-checked-for-nan", "metasam/train/evaluation.py",
           "check_finite_weights(learner_weights(learner), path)", "check_finite_weights(learner.model.state_dict(), path)",
           META_SGD_RUN),
    Mutant("meta-sgd-step-sizes-decayed", "metasam/meta/learner.py",
           'groups.append({"params": list(self.inner_lrs.values()), "weight_decay": 0.0})',
           'groups.append({"params": list(self.inner_lrs.values())})', META_SGD),
    Mutant("meta-sgd-callers-step-sizes-ignored", "metasam/meta/adapter.py",
           "params.get(learned_lr_key(n), a) for n, a in self.inner_lrs.items()", "a for n, a in self.inner_lrs.items()",
           META_SGD),
    Mutant("train-adapt-head-ignored", "metasam/train/meta.py",
           'adapt=model.head if cfg.adapt == "head" else None,', "adapt=None,",
           ("tests/train/test_meta_training.py::test_adapt_head_is_anil_the_body_is_meta_learned_but_never_adapted",)),
    Mutant("meta-sgd-landscape-without-step-sizes", "metasam/analysis/meta_loss.py",
           "lrs = {learned_lr_key(n): a.detach() for n, a in learner.inner_lrs.items()}", "lrs = {}", META_SGD),
]


def run(mutant: Mutant) -> bool:
    """Apply ``mutant``, run its tests, restore; True when at least one test failed (the mutant is caught)."""
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to replace occurs {original.count(mutant.old)} times in {mutant.path}")
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *mutant.tests],
                                cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    print(f"{mutant.name}: " + (f"caught by {len(failed)} tests, e.g. {failed[0][7:].split(' - ')[0]}" if failed else "NOT CAUGHT"),
          flush=True)
    return bool(failed)


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    caught = [run(m) for m in chosen]
    return 0 if all(caught) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
