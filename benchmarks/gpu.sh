#!/usr/bin/env bash
# The GPU check (docs/performance.md, "On a GPU"): the CUDA tests (same meta-gradients as the CPU on both
# paths over tasks, full float32, a killed CUDA run that resumes), then the throughput benchmark on CUDA
# with both paths over tasks against the baselines.
#
#   OUT=gpu-results bash benchmarks/gpu.sh    # from the repository root; default OUT: /tmp/metasam-gpu
#
# Writes $OUT/gpu.txt (the card), $OUT/tests.log, $OUT/throughput.log and $OUT/throughput-cuda.md, and
# refuses to start where OUT already holds a throughput-cuda.md (choose a new OUT). Exit status: non-zero if
# the tests or the benchmark failed (each part runs even when the other fails).
#
# Needs PyTorch with CUDA and `pip install -e ".[dev,bench]"`; higher is timed when importable, and wheels
# placed in .whl/ are installed from there first (for a machine without a network). No dataset is needed:
# the benchmark runs on the synthetic glyph set, the same Conv4 shapes as Omniglot (timing does not depend
# on the pixels). At most 2 minutes of tests and 5 of benchmark, each under its own timeout (peak memory
# is left out: it needs a fresh CUDA process per row). The benchmark rewrites its page after every
# setting, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/metasam-gpu}"
if [ -e "$out/throughput-cuda.md" ]; then
    echo "gpu.sh: $out/throughput-cuda.md exists: set OUT to a new folder (nothing was run)" >&2
    exit 2
fi
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"  # this run's own folder, removed at exit: two runs never share or leave one
    trap 'rm -rf "$site"' EXIT
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.log" | tail -15
tests=${PIPESTATUS[0]}
timeout 300 python3 benchmarks/throughput.py --device cuda --dataset glyphs --settings 5:32,5:16,20:16 \
    --presets maml,sharp-maml-low,agnostic-sam,sharp-maml-up --compare-paths --repeats 3 --no-memory \
    --out "$out/throughput-cuda.md" 2>&1 | tee "$out/throughput.log" | tail -60
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench (124: timed out)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
