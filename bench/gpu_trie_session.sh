#!/usr/bin/env bash
# On the H200, after the payload calls of ../shared/tools/gpu-payload.sh (site in /tmp/site with lm-eval and
# liger-kernel, the GGUF assembled under $COMPRESS_CACHE): the whole default trie at real budgets (params-gpu.yaml)
# as one process per root-to-leaf run, then the GPTQ settings table of bench/quant_space.py as three processes.
#   setsid nohup bash bench/gpu_trie_session.sh /tmp/s2 > /tmp/s2.log 2>&1 &      # then poll for /tmp/s2/DONE
set -u
R=${1:-/tmp/s2}
mkdir -p "$R"
export PYTHONPATH=/tmp/site COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/cc}
# the base's conversion from GGUF, once per machine (cached by content under COMPRESS_CACHE, reused by every checkout)
python3 -c "import time, torch; t = time.perf_counter(); from pipeline.models import default_hf_dir; \
default_hf_dir(torch.bfloat16); print(f'convert {time.perf_counter() - t:.1f} s')" > "$R/convert.log" 2>&1
timeout 570 python3 bench/gpu_trie.py --params params-gpu.yaml --root /tmp/runs/gpu --out "$R/trie" --procs auto \
    --no-anchor > "$R/trie.log" 2>&1
touch "$R/TRIE_DONE"
Q="timeout 420 python3 bench/quant_space.py"
$Q --only gptq4_g64,gptq4_g64_asym,gptq4_g128,rtn4_g128 --out "$R/qs1.json" > "$R/qs1.log" 2>&1 &
$Q --only gptq4_g64_act,gptq4_g64_damp01,gptq4_g64_asym_act --out "$R/qs2.json" > "$R/qs2.log" 2>&1 &
$Q --only gptq3_g64,gptq3_g64_asym,gptq3_g64_asym_act --out "$R/qs3.json" > "$R/qs3.log" 2>&1 &
wait
touch "$R/DONE"
