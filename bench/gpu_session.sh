#!/usr/bin/env bash
# On the H200, after the payload calls of ../shared/tools/gpu-payload.sh (PYTHONPATH=/tmp/site, COMPRESS_CACHE set):
# the PEFT ablation (params-ablation.yaml, 15 nodes x 3 seeds, five processes sharing the GPU) and the quantization
# space (bench/quant_space.py, four processes) at once; `touch /tmp/gpu_session.done` when all have ended.
#   setsid nohup bash bench/gpu_session.sh > /tmp/gpu_session.log 2>&1 &
# then, when /tmp/gpu_session.done exists:
#   python3 bench/gpu_trie.py --params params-ablation.yaml --root /tmp/runs/ablation --out $OUT/ablation \
#     --finish /tmp/ab/o1 /tmp/ab/o2 /tmp/ab/o3 /tmp/ab/o4 /tmp/ab/o5 --no-anchor
set -u
mkdir -p /tmp/ab /tmp/q
python3 -c "import torch; from pipeline.models import default_hf_dir; default_hf_dir(torch.bfloat16)"  # convert once
B="python3 bench/gpu_trie.py --params params-ablation.yaml --root /tmp/runs/ablation"
$B --out /tmp/ab/o1 --nodes base lora lora_adapter_prompt_prefix adapter_prompt > /tmp/ab/log1 2>&1 &
$B --out /tmp/ab/o2 --wait --nodes adapter lora_adapter_prompt lora_prefix > /tmp/ab/log2 2>&1 &
$B --out /tmp/ab/o3 --wait --nodes prompt lora_adapter_prefix adapter_prefix > /tmp/ab/log3 2>&1 &
$B --out /tmp/ab/o4 --wait --nodes prefix lora_prompt_prefix lora_adapter > /tmp/ab/log4 2>&1 &
$B --out /tmp/ab/o5 --wait --nodes adapter_prompt_prefix lora_prompt prompt_prefix > /tmp/ab/log5 2>&1 &
Q="python3 bench/quant_space.py"
$Q --only fp,nf4,int8,rtn4_g64,rtn4_gpc,rtn4_g64_asym,rtn3_g64,rtn3_gpc,rtn3_g64_asym,gptq4_g64 --out /tmp/q/q1.json > /tmp/q/log1 2>&1 &
$Q --only gptq4_gpc,gptq4_g64_asym,gptq4_g64_act --out /tmp/q/q2.json > /tmp/q/log2 2>&1 &
$Q --only gptq4_g64_damp01,gptq3_g64,gptq3_gpc --out /tmp/q/q3.json > /tmp/q/log3 2>&1 &
$Q --only gptq3_g64_asym,gptq3_g64_act,gptq3_g64_damp01 --out /tmp/q/q4.json > /tmp/q/log4 2>&1 &
wait
touch /tmp/gpu_session.done
