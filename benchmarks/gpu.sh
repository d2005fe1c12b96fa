#!/usr/bin/env bash
# The one short GPU check a session lent a GPU machine runs (docs/performance.md, "On a GPU"): the CUDA
# tests (same meta-gradients as the CPU on both paths over tasks, full float32, a killed CUDA run that
# resumes), then the throughput benchmark on CUDA with both paths over tasks against the baselines.
#
#   bash benchmarks/gpu.sh        # from the repository root; results go to $OUT (default /tmp/metasam-gpu)
#
# Then copy $OUT/throughput-cuda.md to docs/results/throughput-cuda.md. Exit status: non-zero if the
# tests or the benchmark failed (each part runs even when the other fails).
#
# Needs PyTorch with CUDA, metasam's dependencies and pytest (the device image has them); higher is
# used when importable (carry its wheel as .whl/, see docs/performance.md). No dataset is needed: the
# benchmark runs on the synthetic glyph set, the same Conv4 shapes as Omniglot (timing does not depend
# on the pixels). Budget: at most 2 minutes of tests and 5 of benchmark, each under its own timeout,
# so that a session's 15 device minutes leave room for the machine's start and one rerun (peak memory
# is left out: a fresh CUDA process per row would take most of it). The benchmark writes its page
# after every setting, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/metasam-gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/metasam-site .whl/*.whl
    export PYTHONPATH="/tmp/metasam-site"
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
