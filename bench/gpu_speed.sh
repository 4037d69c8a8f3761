#!/usr/bin/env bash
# On the H200: the training-speed and latency benchmarks one after the other (each alone on the GPU), after the
# site payload of ../shared/tools/gpu-payload.sh is unpacked in /tmp/site and liger-kernel installed there:
#   setsid nohup bash bench/gpu_speed.sh /tmp/r > /tmp/r.log 2>&1 &     # then poll for /tmp/r/DONE
# Results: /tmp/r/train_speed.json, /tmp/r/latency.json (+ logs); each script prints its table last.
set -u
R=${1:-/tmp/r}
mkdir -p "$R"
export PYTHONPATH=/tmp/site GPTQMODEL_CPU_WORKERS=8
timeout 420 python3 bench/train_speed.py --variants plain,fused,fused_compile,nf4_plain,nf4_fused,nf4_fused_compile \
    --out "$R/train_speed.json" > "$R/train.log" 2>&1
timeout 480 python3 bench/latency.py --shape llama-3.2-1b --kernels triton,torch,marlin --out "$R/latency.json" \
    > "$R/latency.log" 2>&1
touch "$R/DONE"
