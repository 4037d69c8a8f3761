#!/usr/bin/env bash
# On the H200, after the payload calls of ../shared/tools/gpu-payload.sh (site in /tmp/site with lm-eval and
# liger-kernel, the GGUF assembled under $COMPRESS_CACHE): the whole default trie at real budgets (params-gpu.yaml),
# the base's conversion from GGUF included, as N processes sharing the GPU with a memory cap each.
#   setsid nohup bash bench/gpu_trie_session.sh /tmp/s2 8 0.11 > /tmp/s2.log 2>&1 &      # then poll for /tmp/s2/DONE
set -u
R=${1:-/tmp/s2}
PROCS=${2:-8}
FRAC=${3:-0.11}
mkdir -p "$R"
export PYTHONPATH=/tmp/site COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/cc}
T0=$(date +%s.%N)
# the base's conversion from GGUF, once per machine (cached by content under COMPRESS_CACHE, reused by every checkout)
python3 -c "import time, torch; t = time.perf_counter(); from pipeline.models import default_hf_dir; \
default_hf_dir(torch.bfloat16); print(f'convert {time.perf_counter() - t:.1f} s')" > "$R/convert.log" 2>&1
T1=$(date +%s.%N)
timeout 500 python3 bench/gpu_trie.py --params params-gpu.yaml --root /tmp/runs/gpu --out "$R/trie" --procs "$PROCS" \
    --mem-fraction "$FRAC" --no-anchor > "$R/trie.log" 2>&1
T2=$(date +%s.%N)
python3 -c "import sys; a, b, c = map(float, sys.argv[1:]); print(f'convert_s {b - a:.1f} trie_s {c - b:.1f} total_s {c - a:.1f}')" \
    "$T0" "$T1" "$T2" > "$R/wall.txt"
touch "$R/DONE"
