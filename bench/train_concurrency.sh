#!/usr/bin/env bash
# How the GPU's training throughput adds up over processes: N copies of bench/train_graph.py (hybrid, CUDA graph,
# the SmolLM2-135M shape, 8 x 512) started together, for N in $NS, with MPS (an MPS server of our own) and without.
# Prints one line per (mps, N): the sum of the copies' tokens/s and the slowest copy's. The whole trie runs up to 8
# trainings side by side (bench/gpu_trie.py): this says whether more of them at once buys throughput.
#   NS="1 2 4 8" STEPS=150 bash bench/train_concurrency.sh /tmp/tc      # on the H200 (PYTHONPATH=/tmp/site)
set -u
R=${1:-/tmp/tc}
NS=${NS:-1 2 4 8}
STEPS=${STEPS:-150}
mkdir -p "$R"
one() {  # $1 mps 0/1, $2 N
    for i in $(seq 1 "$2"); do
        python3 bench/train_graph.py --runs hybrid:graph --steps "$STEPS" --out "$R/m$1_n$2_$i.json" > "$R/m$1_n$2_$i.log" 2>&1 &
    done
    wait
    python3 - "$R" "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
r, mps, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [json.loads((r / f"m{mps}_n{n}_{i}.json").read_text())["runs"][0] for i in range(1, n + 1)]
tok = [x.get("tokens_per_s", 0) for x in rows]
line = {"mps": int(mps), "n": n, "sum_tok_s": round(sum(tok)), "min_tok_s": round(min(tok)), "errors": [x["error"] for x in rows if "error" in x]}
print(json.dumps(line)); (r / "summary.jsonl").open("a").write(json.dumps(line) + "\n")
PY
}
for n in $NS; do one 0 "$n"; done
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d && { for n in $NS; do one 1 "$n"; done; echo quit | nvidia-cuda-mps-control; }
