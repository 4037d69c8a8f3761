"""GPU latency benchmark: prefill and decode tokens/s of dense bf16, NF4, GPTQ (every kernel that loads offline) and
2:4 semi-structured sparse (cuSPARSELt) models, each through the pipeline's latency loop (dynamic KV cache) and
through `generate()` with a static KV cache (transformers compiles the decode step then). Batch 1, greedy.

    python bench/latency.py --shape llama-3.2-1b --out bench/results/latency.json     # on the H200 (device tool)
    python bench/latency.py --shape tiny --out /tmp/latency.json                      # a CPU dry run of the same code

Every variant is checked against the dense dynamic-cache loop of the same weights: its first greedy tokens must
match (quantized and sparse weights are different models, so they are checked against their own dynamic loop).
Speeds are reported as ratios against the bf16 dense model measured in the same run: the number a user compresses for.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 4)))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_stages import free, make_model, sync  # noqa: E402

from pipeline.models import LM  # noqa: E402
from pipeline.stages.evaluate import latency  # noqa: E402

# Marlin and ExLlama v2 JIT-compile a CUDA extension on first load (Marlin: > 80 s on the H200, measured 2026-11-29;
# that run hit its time limit there), so they run only when asked (--kernels, last); Machete downloads CUTLASS
# (fails offline). Triton and torch need no build.
GPTQ_KERNELS = "triton,torch"


def loop_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens from the pipeline's dynamic-cache decode loop (the reference for every variant)."""
    out = model(input_ids=prompt, use_cache=True)
    past, nxt, toks = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(n):
        toks.append(int(nxt))
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return toks


@torch.no_grad()
def static_generate(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """generate() with a static cache: prefill = 1 new token, decode = the rest; warm-up runs first (compilation)."""
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def timed(n: int) -> tuple[float, list[int]]:
        sync()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        return time.perf_counter() - t0, out[0, prompt.shape[1]:].tolist()

    for _ in range(2):  # compile + CUDA-graph capture happen in the first calls
        timed(new_tokens)
        timed(1)
    pre = statistics.median(timed(1)[0] for _ in range(repeats))
    full, toks = zip(*(timed(new_tokens) for _ in range(repeats)))
    dec = statistics.median(full) - pre
    return {"prefill_tok_s": round(prompt.shape[1] / pre, 1), "decode_tok_s": round((new_tokens - 1) / dec, 2),
            "tokens": list(toks[0])}


def save(rows: list[dict], args) -> None:
    """Written after every model, so a run cut short by a time limit still leaves its rows."""
    base = {r["path"]: r for r in rows if r["model"].endswith("dense") and "decode_tok_s" in r}
    for r in rows:
        b = base.get(r.get("path"))
        if b and "decode_tok_s" in r:
            r["decode_vs_dense"] = round(r["decode_tok_s"] / b["decode_tok_s"], 3)
            r["prefill_vs_dense"] = round(r["prefill_tok_s"] / b["prefill_tok_s"], 3)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "shape": args.shape, "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
           "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


def measure(name: str, model, prompt: torch.Tensor, args, rows: list[dict]) -> None:
    model.eval()
    ref = loop_tokens(model, prompt, args.check_tokens)
    lm = LM(model, None, None, prompt.device)
    r = latency(lm, prompt[0], args.new_tokens, args.repeats)
    rows.append({"model": name, "path": "loop, dynamic cache (pipeline)", "prefill_tok_s": r["prefill_tok_s"],
                 "decode_tok_s": r["decode_tok_s"], "tokens_match": True})
    try:
        s = static_generate(model, prompt, args.new_tokens, args.repeats)
        rows.append({"model": name, "path": "generate, static cache", "prefill_tok_s": s["prefill_tok_s"],
                     "decode_tok_s": s["decode_tok_s"], "tokens_match": s["tokens"][: args.check_tokens] == ref})
    except Exception as exc:  # noqa: BLE001 - a backend without static-cache support is a finding, not a crash
        rows.append({"model": name, "path": "generate, static cache", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    print(json.dumps(rows[-2:]), flush=True)
    save(rows, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", help="llama-3.2-1b | tiny (bench/gpu_stages.py SHAPES)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--kernels", default=GPTQ_KERNELS,
                    help=f"GPTQ kernels to load the 4-bit model with, in order (default {GPTQ_KERNELS}; marlin: "
                         f"compiles its CUDA extension first, minutes)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    tmp = Path(tempfile.mkdtemp())
    src = make_model(tmp / "dense", args.shape, dtype)
    torch.manual_seed(0)
    prompt = torch.randint(10, 4000, (1, args.prompt), device=dev)
    rows: list[dict] = []

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(dev)
    measure("bf16 dense" if cuda else "fp32 dense", model, prompt, args, rows)
    if cuda:  # 2:4 semi-structured sparsity through cuSPARSELt / CUTLASS (PyTorch's to_sparse_semi_structured)
        from torch.sparse import to_sparse_semi_structured

        with torch.no_grad():
            for mod in model.model.layers.modules():
                if isinstance(mod, torch.nn.Linear):
                    w = mod.weight.detach()
                    keep = torch.topk(w.abs().reshape(-1, 4), 2, dim=1).indices
                    mask = torch.zeros_like(w, dtype=torch.bool).reshape(-1, 4).scatter_(1, keep, True).reshape(w.shape)
                    mod.weight.mul_(mask)
        measure("2:4 masked, dense kernels", model, prompt, args, rows)
        try:
            with torch.no_grad():
                for mod in model.model.layers.modules():
                    if isinstance(mod, torch.nn.Linear):
                        mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
            measure("2:4 semi-structured kernels", model, prompt, args, rows)
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": "2:4 semi-structured kernels", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    del model
    free()

    if cuda:  # NF4 and LLM.int8 load through transformers + bitsandbytes (CUDA here)
        for name, q in (("nf4 (bitsandbytes)", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_compute_dtype=dtype)),
                        ("int8 (bitsandbytes)", BitsAndBytesConfig(load_in_8bit=True))):
            try:
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, quantization_config=q, device_map={"": dev})
                measure(name, model, prompt, args, rows)
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            del model
            free()

    # GPTQ 4-bit g128: quantized once by GPTQModel on random calibration tokens, then loaded with each kernel
    from gptqmodel import GPTQModel, QuantizeConfig

    t0 = time.perf_counter()
    gq = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=128 if args.shape != "tiny" else 64, sym=True,
                                                  desc_act=False), device=dev, dtype=dtype)
    calib = [{"input_ids": torch.randint(10, 4000, (512,)).tolist(), "attention_mask": [1] * 512} for _ in range(16)]
    gq.quantize(calib, batch_size=1)
    gq.save(str(tmp / "gptq"))
    del gq
    free()
    print(f"gptq quantize {time.perf_counter() - t0:.1f}s", flush=True)
    for kernel in args.kernels.split(",") if cuda else ("torch",):
        try:
            kw = {"quantization_config": GPTQConfig(bits=4, backend=kernel)} if cuda else {}
            model = AutoModelForCausalLM.from_pretrained(tmp / "gptq", dtype=dtype, device_map={"": dev}, **kw)
            measure(f"gptq 4-bit g128, {kernel}", model, prompt, args, rows)
            del model
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": f"gptq 4-bit g128, {kernel}", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        free()

    save(rows, args)
    print(f"\n{'model':34} {'path':32} {'prefill tok/s':>13} {'decode tok/s':>12} {'dec x dense':>11} match")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:34} {r.get('path', ''):32} ERROR {r['error'][:80]}")
        else:
            print(f"{r['model']:34} {r['path']:32} {r['prefill_tok_s']:>13,.0f} {r['decode_tok_s']:>12,.1f} "
                  f"{r.get('decode_vs_dense', float('nan')):>11.3f} {r['tokens_match']}")


if __name__ == "__main__":
    main()
