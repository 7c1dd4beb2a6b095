#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100 (each step capped at STEP_TIMEOUT=95 s): kernels at real shapes, layer/block/pipeline/memory benches,
# one summary table. Usage: scripts/gpu-check.sh [OUT_DIR]   (default: gpu-check-<date>)
# Prints the table and leaves every JSON/Markdown in OUT_DIR; paste the table into docs/benchmarks.md with
# the device named (the first line says which).
set -euo pipefail
out="${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python - <<'PY' || { echo "segquant: error: gpu-check needs a CUDA device" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
step() { echo "== $1" >&2; shift; timeout "${STEP_TIMEOUT:-95}" "$@" || echo "!! step failed or timed out: $*" >&2; }
# 1. fused Triton W8A8 vs the reference at M=4096, K=N=3072 (static, dual, 24 in-segments) and the fp8 path
step kernels python -m segquant_core.bench.kernels --device cuda --m 4096 --k 3072 --n 3072 --json "$out/kernels.json"
# 2. layer bench at SD3.5-medium shapes vs cuBLAS bf16 and torch.compile bf16
step layer segquant bench layer --model sd35 --tokens 4096 --rounds 10 --device cuda --json "$out/layer.json"
# 3. one SD3.5-medium block
step block segquant bench block --tokens 4096 --rounds 10 --device cuda --json "$out/block.json"
# 4. the shipped MMDiT end to end, with peak memory per variant (fresh processes)
step pipeline segquant bench pipeline --model shipped:mmdit --rounds 3 --memory --device cuda --json "$out/pipeline.json"
# 5. checkpoint load/serve memory on a random SD3.5-medium (4 of 24 blocks)
step memory segquant bench memory --layers 4 --device cuda --json "$out/memory.json"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
env = None
lines = ["| bench | case | candidate | median ms | vs bf16 | rel err | memory bytes | target |", "|---|---|---|---|---|---|---|---|"]
for name in ("kernels", "layer", "block", "pipeline", "memory"):
    path = out / f"{name}.json"
    if not path.is_file():
        lines.append(f"| {name} | (no result) | | | | | | |")
        continue
    data = json.loads(path.read_text())
    env = env or data.get("environment")
    for r in data["rows"]:
        case = r.get("case") or r.get("shape") or r.get("probe") or ""
        cand = r.get("candidate") or r.get("variant") or r.get("backend") or ""
        ms = r.get("median_ms") or (r.get("s_per_image") and round(r["s_per_image"] * 1e3, 2)) or ""
        err = r.get("rel_err_vs_reference", r.get("rel_err", r.get("error", "")))
        mem = r.get("cuda_max_allocated_bytes") or r.get("peak_memory_bytes") or r.get("peak_rss_bytes") or ""
        tgt = f">= {r['target_vs_bf16']}x: {'met' if r['met'] else 'NOT met'}" if "target_vs_bf16" in r else ""
        lines.append(f"| {name} | {case} | {cand} | {ms} | {r.get('vs_bf16', r.get('vs_fp', ''))} | {err} | {mem} | {tgt} |")
    if name == "memory":
        lines.append(f"| memory | targets_met | {data.get('targets_met')} | | | | | |")
device = f"{env.get('gpu')} (sm_{env.get('capability')}), torch {env.get('torch')}" if env else "unknown device"
table = f"GPU check on {device}\n\n" + "\n".join(lines) + "\n"
(out / "summary.md").write_text(table)
print(table)
PY
