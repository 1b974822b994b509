#!/usr/bin/env bash
# The prepared GPU check of docs/performance.md: tokens/s, MFU at 4N and peak memory of a LLaMA-7B-shaped
# random-init base in bf16, sequence 2048, ZeRO-3 on one GPU, through the real launcher. Finishes in < 10 min.
#   bash tools/gpu_check.sh            (prints a JSON line; runs/gpu_check/ holds the run)
set -euo pipefail
cd "$(dirname "$0")/.."
# before anything is written or launched: without CUDA the launcher would fail deep inside DeepSpeed
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: tools/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False on this machine); nothing was run" >&2
  exit 2
fi
mkdir -p runs/gpu_check && rm -rf runs/gpu_check/run
python3 - <<'PY'
import json, random
random.seed(0)
words = "the of and to in a is that for it as with was on be by this are from at or".split()
with open("runs/gpu_check/long.jsonl", "w") as f:   # > 2048 byte tokens each: truncated to 2048
    for _ in range(16):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(800))}) + "\n")
PY
deepspeed --num_gpus 1 tagscale/train.py --ds_config ds_configs/zero3_bf16.json --config tools/recipes/gpu_7b.yaml "$@"
python3 - <<'PY'
import json, statistics, torch
rows = [r for r in map(json.loads, open("runs/gpu_check/run/metrics.jsonl")) if "loss" in r][2:]   # first steps warm up
n = 6_738_415_616 - 32000 * 4096                                              # non-embedding parameters
tps = statistics.median(r["tokens_per_s"] for r in rows)
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
name = torch.cuda.get_device_name()
flops = next((v for k, v in peak.items() if k in name), float("nan"))
print(json.dumps({"device": name, "tokens_per_s": tps, "mfu_4N": 4 * n * tps / flops,
                  "peak_memory": rows[-1].get("peak_rss_bytes_per_rank"), "step_s": statistics.median(r["step_s"] for r in rows)}))
PY
