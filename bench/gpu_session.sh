#!/usr/bin/env bash
# On the H200, after the payload calls of ../shared/tools/gpu-payload.sh (PYTHONPATH=/tmp/site, COMPRESS_CACHE set):
# the PEFT ablation (params-ablation.yaml: 15 nodes x 3 seeds) as eight processes sharing the GPU, each node's metrics
# in /tmp/runs/ablation/metrics; the report is written from them afterwards (python -m pipeline report -p ...).
#   bash bench/gpu_session.sh; cp -r /tmp/runs/ablation/metrics $OUT/
set -u
mkdir -p /tmp/ab
python3 -c "import torch; from pipeline.models import default_hf_dir; default_hf_dir(torch.bfloat16)"  # convert once
B="timeout ${ABLATION_TIMEOUT:-900} python3 bench/gpu_trie.py --params params-ablation.yaml --root /tmp/runs/ablation"
$B --out /tmp/ab/o1 --nodes base lora lora_adapter_prompt_prefix > /tmp/ab/log1 2>&1 &
$B --out /tmp/ab/o2 --wait --nodes adapter lora_adapter_prompt > /tmp/ab/log2 2>&1 &
$B --out /tmp/ab/o3 --wait --nodes prompt lora_adapter_prefix > /tmp/ab/log3 2>&1 &
$B --out /tmp/ab/o4 --wait --nodes prefix lora_prompt_prefix > /tmp/ab/log4 2>&1 &
$B --out /tmp/ab/o5 --wait --nodes adapter_prompt_prefix lora_prompt > /tmp/ab/log5 2>&1 &
$B --out /tmp/ab/o6 --wait --nodes prompt_prefix lora_adapter > /tmp/ab/log6 2>&1 &
$B --out /tmp/ab/o7 --wait --nodes adapter_prompt lora_prefix > /tmp/ab/log7 2>&1 &
$B --out /tmp/ab/o8 --wait --nodes adapter_prefix > /tmp/ab/log8 2>&1 &
wait
