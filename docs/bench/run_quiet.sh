#!/usr/bin/env bash
# The issue-15 benchmarks as one quiet run, in the order docs/benchmarks.md reports them.
# Usage: docs/bench/run_quiet.sh [OUT]   (default OUT: docs/bench; each step logs its load average)
# Run it with nothing else on the machine: every figure is a ratio measured side by side, but OpenMP
# barriers under load bias the candidates that make many short calls.
set -euo pipefail
OUT=${1:-docs/bench}
mkdir -p "$OUT"
step() {
  local name=$1; shift
  echo "== $(date -u +%H:%M:%S) $name — load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/quiet-run.log"
  "$@" 2>&1 | tee "$OUT/$name.log" || echo "== $name FAILED (exit $?)" | tee -a "$OUT/quiet-run.log"
  echo "== $(date -u +%H:%M:%S) $name done — load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/quiet-run.log"
}
# 1. every layer shape of the targets, against PT2E and OpenVINO INT8 (includes the exact and folded per-head forms)
step bench-layer-peers segquant bench layer --model targets --peers pt2e,openvino --rounds 6 \
  --json "$OUT/bench-layer-peers.json"
# 2. the SD3.5-medium block, eager and compiled, with both peers, in one alternation
step bench-block-quiet segquant bench block --recipes w8a8,w8a8-segquant,w4a8-segquant --peers pt2e,openvino \
  --compile --rounds 5 --json "$OUT/bench-block-quiet.json"
# 3. the shipped MMDiT pipeline at batch 4 and 1, eager and compiled, fp in bf16 (this CPU's fp precision), with both
#    peers' int8 denoisers inside the same pipeline and alternation
for b in 4 1; do
  step "bench-pipeline-b$b" segquant bench pipeline --model shipped:mmdit --variants w8a8,w8a8-segquant,w4a8-segquant \
    --batch "$b" --compile --precision bfloat16 --peers pt2e,openvino --rounds 5 --json "$OUT/bench-pipeline-b$b.json"
done
# 4. our native path, eager and compiled, against ONNX Runtime on our own QDQ export of the shipped w8a8-segquant
#    denoiser
step export-onnx-check segquant export-onnx segquant_shapes/weights/mmdit/variants/w8a8-segquant \
  --model shipped:mmdit --out "$OUT/mmdit-w8a8-segquant.onnx" --check --json "$OUT/export-onnx-check.json"
step export-onnx-check-compiled segquant export-onnx segquant_shapes/weights/mmdit/variants/w8a8-segquant \
  --model shipped:mmdit --out "$OUT/mmdit-w8a8-segquant.onnx" --check --compile \
  --json "$OUT/export-onnx-check-compiled.json"
rm -f "$OUT/mmdit-w8a8-segquant.onnx"
