"""PEFT training speed and memory: plain peft + the HF loss (the baseline, in the same run) against the project's
loss path (pipeline.models.LM.loss with the fused linear + cross-entropy: liger-kernel on CUDA, chunked torch on
CPU), optionally with the decoder layers torch.compile'd.

The Llama-3.2-1B SHAPE with random weights (no download): hidden 2048, intermediate 8192, 16 layers, 32 heads,
8 KV heads, vocab 128256, tied embeddings; LoRA r=8 on q/v; batches of 8 x 1024 tokens; bf16 on GPU. Every variant
starts from the same weights, the same LoRA init and the same batches, so their loss curves must agree.

    python bench/train_speed.py                       # GPU: writes bench/results/train_speed.json, prints a table
    python bench/train_speed.py --variants plain,fused,fused_compile,nf4_plain,nf4_fused   # nf4_*: QLoRA (bnb NF4 base)
    python bench/train_speed.py --tiny                # CPU check of the script itself (a tiny model, seconds)
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models import LM  # noqa: E402
from pipeline.stages.peft import compile_layers  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, rope_theta=500000.0),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int, nf4: bool = False):
    """A random Llama of a real model's shape (tied embeddings), built seeded on the target device, frozen. nf4: the
    same weights saved and reloaded through transformers + bitsandbytes NF4 (a QLoRA base). Shared by the bench
    scripts that time training (train_graph.py too)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if nf4:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=q,
                                                         device_map={"": str(device)})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int, nf4: bool = False):
    """The same random model and LoRA init for every variant (random_model, then LoRA r=8 on q/v)."""
    from peft import LoraConfig, get_peft_model

    model = random_model(shape, device, dtype, seed, nf4)
    torch.manual_seed(seed + 1)  # the same LoRA init whatever the base
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def batches(vocab: int, batch: int, seq: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Token ids from a fixed Zipf-like distribution (a learnable signal, unlike uniform noise), the same each run."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return [torch.multinomial(probs, batch * seq, replacement=True, generator=gen).view(batch, seq) for _ in range(steps)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, args, device: torch.device, dtype: torch.dtype, data: list[torch.Tensor]) -> dict:
    model = build(args.shape, device, dtype, args.seed, nf4=name.startswith("nf4_"))
    lm = LM(model, None, None, device)
    name = name.removeprefix("nf4_")
    fused = name.startswith("fused")
    if name.endswith("compile"):
        compile_layers(lm)  # what the PEFT stage does with `compile: true` (CUDA only)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for i, ids in enumerate(data):
        ids = ids.to(device, non_blocking=True)
        sync(device)
        t0 = time.perf_counter()
        if name == "plain":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # plain peft + the HF loss
        else:
            loss = lm.loss(ids, fused=fused)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 5))
    timed = times[args.warmup:]
    tokens = data[0].numel()
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # CPU: process max RSS, not resettable
    out = {"loss_impl": lm.loss_impl(fused) if name != "plain" else "hf (plain peft)",
           "tokens_per_s": round(tokens * len(timed) / sum(timed), 1),
           "step_s_median": round(sorted(timed)[len(timed) // 2], 4),
           "peak_memory_gib": round(peak, 3), "losses": losses}
    del model, lm, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    ap.add_argument("--variants", default="plain,fused", help="comma-separated: plain, fused, fused_compile")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant (default 50; --tiny 6)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (default 5; --tiny 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_speed.json")
    args = ap.parse_args()
    args.shape = "tiny" if args.tiny else "llama-3.2-1b"
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 64)
        args.out = args.out.with_name("train_speed_tiny.json") if args.out.name == "train_speed.json" else args.out
    args.steps = args.steps or (6 if args.tiny else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmul on CPU is ~150x slower
    data = batches(SHAPES[args.shape]["vocab_size"], args.batch, args.seq, args.steps, args.seed)
    results = {}
    for name in args.variants.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = run_variant(name, args, device, dtype, data)
        except Exception as exc:  # noqa: BLE001  (one variant failing, e.g. compile, must not lose the others)
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name}: {results[name]['error']}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for name, r in results.items():
        base = results.get("nf4_plain" if name.startswith("nf4_") else "plain")  # QLoRA against plain QLoRA
        if base and "error" not in base and "error" not in r and name not in ("plain", "nf4_plain"):
            r["speedup_vs_plain"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["memory_vs_plain"] = round(r["peak_memory_gib"] / base["peak_memory_gib"], 3)
            r["max_abs_loss_diff_vs_plain"] = round(max(abs(a - b) for a, b in zip(r["losses"], base["losses"])), 5)
    import peft
    import transformers

    record = {"shape": args.shape, **SHAPES[args.shape], "tied": True, "lora": "r=8 q_proj,v_proj",
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "timed_steps": args.steps - args.warmup,
              "dtype": str(dtype).removeprefix("torch."),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "variants": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{args.shape}, {args.batch} x {args.seq}, {record['dtype']} on {record['device']}, "
          f"{record['timed_steps']} timed steps; {args.out}")
    print(f"{'variant':<15}{'loss':<18}{'tok/s':>10}{'x plain':>9}{'peak GiB':>10}{'x plain':>9}{'loss[0]':>9}"
          f"{'loss[-1]':>9}{'max|Δloss|':>11}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<15}ERROR {r['error'][:100]}")
            continue
        print(f"{name:<15}{r['loss_impl']:<18}{r['tokens_per_s']:>10.0f}{r.get('speedup_vs_plain', 1.0):>9.2f}"
              f"{r['peak_memory_gib']:>10.2f}{r.get('memory_vs_plain', 1.0):>9.2f}{r['losses'][0]:>9.4f}"
              f"{r['losses'][-1]:>9.4f}{r.get('max_abs_loss_diff_vs_plain', 0.0):>11.5f}")
    if any(not math.isfinite(x) for r in results.values() for x in r.get("losses", [])):
        sys.exit("a loss is not finite")


if __name__ == "__main__":
    main()
