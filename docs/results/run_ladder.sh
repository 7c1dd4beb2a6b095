#!/bin/bash
# One ladder of docs/results.md (the same variant list on every model), run as three `segquant eval` processes
# side by side (one torch thread each: on a 2-core machine shared by many jobs, one thread ran a 20-step image
# 10x faster than two),
# then merged into one report. Every part generates the same fp images and records the same calibration
# calls (both are seeded), so the parts are comparable row for row; merge_reports.py checks that.
#
#   docs/results/run_ladder.sh MODEL OUT_DIR [NUM_PROMPTS] [SEEDS] [CALIB_SAMPLES]
#   MODEL: shipped:mmdit, shipped:unet, shipped:flux or a pipeline folder
set -euo pipefail
usage="usage: run_ladder.sh MODEL OUT_DIR [NUM_PROMPTS] [SEEDS] [CALIB_SAMPLES]"
model=${1:?$usage}
out=${2:?$usage}
prompts=${3:-32}
seeds=${4:-0,1}
calib=${5:-256}
parts=(
  "fp,w8a8,w8a8-smooth,w8a8-smooth:seg=on,w8a8-smooth:dual=on,w8a8-segquant"
  "fp,w8a8-segquant:smooth_scope=segment,w4a8-segquant:smooth=off+seg=off+dual=off,w4a8-segquant:seg=off+dual=off,w4a8-segquant:dual=off,w4a8-segquant:seg=off"
  "fp,w4a8-segquant,w4a8-segquant:smooth_scope=segment,fp8-segquant:seg=off+dual=off,fp8-segquant"
)
mkdir -p "$out"
pids=()
for i in "${!parts[@]}"; do
  OMP_NUM_THREADS=1 python -m segquant_cli eval "$model" --num-prompts "$prompts" --seeds "$seeds" --steps 20 \
    --guidance 3 --calib-samples "$calib" --variants "${parts[$i]}" --out "$out/part$((i + 1))" \
    > "$out/part$((i + 1)).log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python "$(dirname "$0")/merge_reports.py" "$out" "$out"/part*/report.json
exit $status
