#!/bin/bash
# The 20-way 1-shot Omniglot study (docs/bench.md): maml, sharp-maml-low and agnostic-sam, 3 seeds, radii chosen on
# validation, the controls, one fixed test TaskSet of 1,000 tasks. Two workers of one thread each on a 2-core machine
# share the cells as they go (the controls once the grid is finished), then the merge writes OUT/results.md,
# results.json and results.png. Resumable: run it again with the same DATA and OUT.
#
#   DATA=/path/to/data OUT=runs/omniglot20w1s bash benchmarks/omniglot20_study.sh
#
# DATA holds omniglot/images_background_small1.zip and images_background_small2.zip. The same table comes from
# the single command printed in OUT/results.md (one process, no shards). --test-on-finish tests each run as it
# finishes, so that the study's evidence outlives its checkpoints (docs/bench.md): the machines it ran on kept no
# file between working sessions, and a finished run's *.pt and val_tasks.json were not kept.
set -euo pipefail
: "${DATA:?set DATA to the folder holding omniglot/}" "${OUT:?set OUT to the study folder}"
ARGS=(--dataset omniglot --data-root "$DATA" --settings 20w1s --seeds 0,1,2
  --algos maml,sharp-maml-low,agnostic-sam
  --grid sharp-maml-low:inner_rho=0.0025,0.01,0.04
  --grid agnostic-sam:inner_rho1=0.005,0.02,0.08 --grid agnostic-sam:inner_rho2=rho1/2
  --controls --reference maml
  --train-split "Balinese,Early_Aramaic,Greek,Korean,Latin,Sanskrit,Tagalog" --test-split "Japanese_(katakana)"
  --iterations 300 --meta-batch 8 --val-every 50 --val-tasks 100 --episodes 1000 --test-seed 1234
  --test-on-finish --out "$OUT" --no-progress)
mkdir -p "$OUT"
pids=()
for i in 0 1; do
  OMP_NUM_THREADS=1 metasam bench "${ARGS[@]}" --worker >> "$OUT/worker$i.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "workers done $(date -Is)" >> "$OUT/driver.log"
metasam bench --out "$OUT" --merge --no-progress 2>&1 | tee -a "$OUT/merge.log"
