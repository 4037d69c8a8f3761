"""The PEFT stage's training loop (pipeline.stages.peft.train, unchanged) in eager mode against the same loop with
`cuda_graph: true` (one whole step recorded as a CUDA graph and replayed), on the default
model's SHAPE: SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
embeddings), random weights, bf16, 8 x 512-token windows of a token stream, the real PEFT configs of
params-gpu.yaml (hybrid = LoRA q/v + adapters + soft prompt, and each single method), optionally over an NF4 base.
Every variant of a config starts from the same weights, PEFT init, batches and held-out sample, so their held-out
curves must agree: the table's last column is the largest held-out loss difference from eager.

    python bench/train_graph.py                    # GPU: writes bench/results/train_graph.json, prints a table
    python bench/train_graph.py --tiny             # CPU check of the script (the graph falls back: no CUDA)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import data  # noqa: E402
from pipeline.config import PeftCfg  # noqa: E402
from pipeline.models import LM  # noqa: E402
from pipeline.stages.peft import add_peft, train  # noqa: E402
from train_speed import SHAPES, random_model  # noqa: E402  (bench/, on sys.path as the script's folder)

# config name -> PEFT methods; mode -> stage options. "eager" is what params-gpu.yaml ran before (fused loss)
CONFIGS = {"hybrid": ["lora", "adapter", "prompt"], "lora": ["lora"], "adapter": ["adapter"], "prompt": ["prompt"],
           "prefix": ["prefix"]}
# (cuda_graph with compile: true failed to record on the H200 and broke the process's CUDA state; the config
# now refuses the pair)
MODES = {"eager": {}, "eager_hf": {"fused_loss": "off"}, "graph": {"cuda_graph": True}}


def run(name: str, args, device: torch.device, dtype: torch.dtype, stream: torch.Tensor, heldout: data.Batch) -> dict:
    config, mode = name.rsplit(":", 1)
    nf4 = config.startswith("nf4_")
    methods = CONFIGS[config.removeprefix("nf4_")]
    cfg = PeftCfg(kind="peft", methods=methods, steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                  lr=5e-4, warmup_steps=min(50, args.steps // 4), eval_every=args.eval_every,
                  eval_sequences=len(heldout), **MODES[mode])
    lm = LM(random_model(args.shape, device, dtype, args.seed, nf4).eval(), None, None, device)
    trainable = add_peft(lm, cfg, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = train(lm, trainable, cfg, stream, args.seed, heldout)
    wall = time.perf_counter() - t
    # what the caching allocator held at most (allocated + cached + graph pools): what a memory cap must admit
    reserved = round(torch.cuda.max_memory_reserved() / 2**20, 1) if device.type == "cuda" else None
    del lm, trainable
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"config": config, "mode": mode, "wall_s": round(wall, 2), **{k: res[k] for k in (
        "seconds", "tokens_per_s", "peak_memory_mb", "loss_impl", "cuda_graph", "loss_first", "loss_last")},
        "peak_reserved_mb": reserved, "heldout": [c["heldout_loss"] for c in res["curve"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    ap.add_argument("--runs", default="hybrid:eager,hybrid:eager_hf,hybrid:graph,"
                    "lora:eager,lora:graph,adapter:eager,adapter:graph,prompt:eager,prompt:graph,"
                    "prefix:eager,prefix:graph",
                    help="comma-separated CONFIG:MODE, CONFIG in hybrid, lora, adapter, prompt, prefix (nf4_ prefix: "
                    "over an NF4 base, needs bitsandbytes), MODE in " + ", ".join(MODES))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100; --tiny 8)")
    ap.add_argument("--eval-every", type=int, default=25, help="held-out loss every N steps (the curve compared)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_graph.json")
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.steps, args.eval_every, args.seq = "tiny", args.steps or 8, 4, 64
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/train_graph.py: no CUDA device; run it on the GPU, or pass --tiny to check it on CPU")
        args.shape, args.steps = "smollm2-135m", args.steps or 100
        device, dtype = torch.device("cuda"), torch.bfloat16
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)  # Zipf-like: a learnable signal
    stream = torch.multinomial(probs, 400_000 if not args.tiny else 20_000, replacement=True, generator=gen)
    heldout = data.Batch.of(torch.multinomial(probs, 32 * args.seq, replacement=True, generator=gen).view(32, args.seq))

    rows = []
    for name in args.runs.split(","):
        try:
            rows.append(run(name, args, device, dtype, stream, heldout))
        except Exception as e:  # one failing variant must not lose the others' numbers
            rows.append({"config": name.rsplit(":", 1)[0], "mode": name.rsplit(":", 1)[1], "error": repr(e)[:400]})
        print(json.dumps(rows[-1]), flush=True)
    eager = {r["config"]: r for r in rows if r["mode"] == "eager" and "error" not in r}
    for r in rows:
        base = eager.get(r["config"])
        if base and "error" not in r:
            r["x_eager_tok_s"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
            r["x_eager_memory"] = round(r["peak_memory_mb"] / base["peak_memory_mb"], 2)
            r["max_heldout_diff"] = round(max(abs(a - b) for a, b in zip(r["heldout"], base["heldout"])), 4)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "shape": args.shape, "steps": args.steps, "batch": args.batch, "seq": args.seq,
           "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "runs": rows}, indent=1) + "\n")
    print("| config | mode | tok/s | x eager | peak MB | x eager | loss impl | graph | max held-out diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['mode']} | error: {r['error'][:120]} |||||||")
            continue
        print(f"| {r['config']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r.get('x_eager_tok_s', '-')} | "
              f"{r['peak_memory_mb']:,.0f} | {r.get('x_eager_memory', '-')} | {r['loss_impl']} | {r['cuda_graph']} | "
              f"{r.get('max_heldout_diff', '-')} |")


if __name__ == "__main__":
    main()
