#!/usr/bin/env bash
# On the H200, after the payload calls of ../shared/tools/gpu-payload.sh (site in /tmp/site with lm-eval and
# liger-kernel, the GGUF assembled under $COMPRESS_CACHE): the whole default trie at real budgets (params-gpu.yaml)
# as N worker processes sharing the GPU with a memory cap each; the base's conversion from GGUF is the base build
# job (on a fresh machine, so inside the wall time). MPS=1: through an MPS server of our own (pipe and log dirs
# under /tmp, stopped at the end), so the workers' kernels run side by side instead of taking turns.
#   MPS=1 bash bench/gpu_trie_session.sh /tmp/s9 12 0.09      # results in /tmp/s9/trie, wall time in /tmp/s9/wall.txt
set -u
R=${1:-/tmp/s2}
PROCS=${2:-12}
FRAC=${3:-0.09}
LIMIT=${LIMIT:-540}
mkdir -p "$R"
export PYTHONPATH=/tmp/site COMPRESS_CACHE=${COMPRESS_CACHE:-/tmp/cc}
# GPTQModel's packer JIT-builds a C++ extension on its first use on a machine (~90 s of every GPTQ node here, the
# processes waiting on one build); its vectorized torch path packs a layer in milliseconds
export GPTQMODEL_DISABLE_PACK_EXT=1
# Memory caps fail on fragmentation, not on need: in s7 / s8 the trainings that ran out held 2.3-4.6 GiB reserved but
# unallocated. Expandable segments let the allocator grow and shrink segments instead (bench/results/train_alloc.json:
# CUDA-graph training runs under them, same losses)
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
MPS_ON=0
if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    nvidia-cuda-mps-control -d && MPS_ON=1
fi
# expandable segments map memory through CUDA's virtual memory API: checked here under the same MPS setting (a
# failure would fail every worker), dropped with a note if it does not work
if ! python3 - > "$R/alloc_check.txt" 2>&1 <<'PY'
import gc
import torch
x = [torch.empty(2**28, device="cuda") for _ in range(4)]  # 4 GiB, freed and handed back
del x
gc.collect()
torch.cuda.empty_cache()
y, g = torch.zeros(8, device="cuda"), torch.cuda.CUDAGraph()
with torch.cuda.graph(g):  # what the trainings record
    y.add_(1)
g.replay()
torch.cuda.synchronize()
assert y.sum().item() == 8, y
print("allocator check ok:", torch.cuda.memory_reserved())
PY
then
    echo "PYTORCH_ALLOC_CONF=$PYTORCH_ALLOC_CONF failed its check (alloc_check.txt): running without it" | tee -a "$R/alloc_check.txt"
    unset PYTORCH_ALLOC_CONF
fi
T0=$(date +%s.%N)
timeout "$LIMIT" python3 bench/gpu_trie.py --params params-gpu.yaml --root /tmp/runs/gpu --out "$R/trie" --procs "$PROCS" \
    --mem-fraction "$FRAC" --no-anchor > "$R/trie.log" 2>&1
T1=$(date +%s.%N)
[ "$MPS_ON" = 1 ] && echo quit | nvidia-cuda-mps-control
python3 -c "import sys; a, b = map(float, sys.argv[1:3]); print(f'trie_s {b - a:.1f} procs {sys.argv[3]} mps {sys.argv[4]}')" \
    "$T0" "$T1" "$PROCS" "$MPS_ON" > "$R/wall.txt"
touch "$R/DONE"
