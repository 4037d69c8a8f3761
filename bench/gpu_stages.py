"""GPU benchmark: each stage on a Llama-3.2-1B-shaped random model, next to the plain library called directly in
the same run (HF forward, peft LoRA, peft + bitsandbytes QLoRA, GPTQModel). Prints a table; writes JSON to --out.

    python bench/gpu_stages.py --out bench/results/gpu_stages.json         # on the H200 (device tool)
    python bench/gpu_stages.py --tiny --out /tmp/tiny.json                 # a CPU dry run of the same code

Ratios are stage / plain (throughput) or plain / stage (seconds): >= 1.0 means the stage is not slower.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import parse_params  # noqa: E402
from pipeline.models import LM, load_lm, save_weights, train_tokenizer  # noqa: E402
from pipeline.runner import artifact_path, run_node  # noqa: E402

SHAPES = {  # Llama-3.2-1B's and SmolLM2-135M's shapes; random weights (speed does not need trained ones)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def make_model(out: Path, shape: str, dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    text = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()
    tok = train_tokenizer(text[:300_000], 4096)
    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **SHAPES[shape])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    save_weights(model, tok, out)
    del model
    free()
    return out


def plain_train(model, batch: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    """The peft README loop: forward with labels, backward, AdamW. Returns (tokens/s, peak GiB of training).

    Timed like the stage (every step, optimizer state creation included); the peak is reset after loading."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    sync()
    free()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    sync()
    return steps * batch.numel() / (time.perf_counter() - t0), peak_gib()


def timed_forward(fn, batch: torch.Tensor, iters: int) -> float:
    with torch.no_grad():
        fn(batch)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(batch)
        sync()
    return iters * batch.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, CPU-sized steps: a dry run of the code paths")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-work"), help="scratch dir for models and artifacts")
    ap.add_argument("--gptq-only", action="store_true", help="only the GPTQ row (GPTQModel vs the quantize stage)")
    args = ap.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "4")
    cuda = torch.cuda.is_available()
    shape = "tiny" if args.tiny else "llama-3.2-1b"
    bsz, seq, steps, fwd_iters = (2, 64, 3, 2) if args.tiny else (8, 1024, 30, 20)
    calib_n, calib_len = (4, 64) if args.tiny else (64, 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").unlink(missing_ok=True)
    (work / "data").symlink_to(ROOT / "data")
    os.chdir(work)
    rows: list[dict] = []
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "shape": shape,
           "batch": [bsz, seq], "steps": steps}
    print(json.dumps(env))

    t0 = time.perf_counter()
    model_dir = make_model(work / "model", shape, dtype)
    print(f"model built in {time.perf_counter() - t0:.1f}s")

    peft_cfg = {"kind": "peft", "methods": ["lora"], "lora_r": 8, "lora_alpha": 16, "steps": steps,
                "batch_size": bsz, "seq_len": seq, "lr": 1e-4}
    params = parse_params({
        "model": {"source": str(model_dir), "dtype": "bfloat16", "device": device},
        "data": {"calibration": {"files": "data/c4-en-train-first1000/c4_sample.jsonl", "format": "json",
                                 "samples": calib_n, "seq_len": calib_len},
                 "domain": {"files": "data/tinyshakespeare/input.txt"},
                 "eval": {"wikitext2": {"files": "data/wikitext2-raw-v1/wiki.test.raw"}}},
        "evaluate": {"seq_len": 256 if args.tiny else 1024, "max_tokens": 512 if args.tiny else 4096,
                     "latency_prompt": 32 if args.tiny else 128, "latency_new_tokens": 4 if args.tiny else 32},
        "stages": {"lora": peft_cfg, "qlora": peft_cfg, "nf4": {"kind": "quantize", "method": "nf4"},
                   "gptq": {"kind": "quantize", "method": "gptq", "group_size": 128}},
        "orderings": {"lora": ["lora"], "qlora": ["nf4", "qlora"], "gptq": ["gptq"]},
    })
    batch = torch.randint(0, 4096, (bsz, seq), device=device)

    # -- plain libraries -------------------------------------------------------------------------------
    if not args.gptq_only:  # training and forward rows
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        free()
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        warm = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device), lora)
        plain_train(warm, batch, 2, 1e-4)  # untimed: the process's first backward pays one-off CUDA set-up costs
        del warm
        free()
        plain_fwd = max(timed_forward(lambda b: hf(input_ids=b).logits, batch, fwd_iters) for _ in range(2))

        def best_of_two(model, key: str) -> tuple[float, float]:
            """Train twice with the plain loop; keep the faster run (and the first run's peak)."""
            (tok_s, peak), (again, _) = plain_train(model, batch, steps, 1e-4), plain_train(model, batch, steps, 1e-4)
            env[key] = [round(tok_s), round(again)]
            return max(tok_s, again), peak

        plain_lora, plain_lora_peak = best_of_two(get_peft_model(hf, lora), "plain_lora_runs")
        del hf
        free()
        if cuda:
            q = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device}, quantization_config=
                                                     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                        bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True))
            plain_qlora, plain_qlora_peak = best_of_two(get_peft_model(q, lora), "plain_qlora_runs")
            del q
            free()
    from gptqmodel import GPTQModel, QuantizeConfig

    from pipeline import data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = [{"input_ids": ids[0].tolist(), "attention_mask": [1] * ids.shape[1]}
             for ids in data.calibration(tok, params.data.calibration, params.seed)]

    def plain_gptq() -> float:
        default_dtype = torch.get_default_dtype()  # GPTQModel changes the process-wide default (the stage restores it too)
        t0 = time.perf_counter()
        try:
            g = GPTQModel.load(str(model_dir), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False),
                               device=device, dtype=dtype)
            g.quantize(calib, batch_size=1)
            g.save(str(work / "plain-gptq"))
        finally:
            torch.set_default_dtype(default_dtype)
        seconds = time.perf_counter() - t0
        del g
        free()
        return seconds

    # GPTQModel's first use in a process pays one-off costs (kernel JIT, Triton compiles): time plain both before
    # and after the stage and keep the faster, so run order does not decide the ratio
    plain_gptq_s = plain_gptq()

    # -- the stages ------------------------------------------------------------------------------------
    names = ("base", "gptq") if args.gptq_only else ("base", "lora", "nf4", "nf4-qlora", "gptq")
    res = {name: run_node(name, params) for name in names}
    # timing noise on a 2-3 s measurement is ~5%: train each way twice and keep the better run, plain and stage alike
    for name in () if args.gptq_only else ("lora", "nf4-qlora"):
        again = run_node(name, params)["train"]
        env[f"stage_{name}_runs"] = [round(res[name]["train"]["tokens_per_s"]), round(again["tokens_per_s"])]
        if again["tokens_per_s"] > res[name]["train"]["tokens_per_s"]:
            res[name]["train"] = again
    env["plain_gptq_s_first"] = round(plain_gptq_s, 2)
    plain_gptq_s = min(plain_gptq_s, plain_gptq())
    # the stage likewise, twice, the faster kept: its first run in the process pays its own first-use costs (CUDA
    # graphs, cuBLAS / Triton for the round-trip check): 60.5 s then 47.5 s on the H200 (gptq_profile_before.txt)
    again = run_node("gptq", params, force=True)["stage_seconds"]
    env["stage_gptq_runs_s"] = [round(res["gptq"]["stage_seconds"], 2), round(again, 2)]
    res["gptq"]["stage_seconds"] = min(res["gptq"]["stage_seconds"], again)
    if not args.gptq_only:
        lm: LM = load_lm(artifact_path("base"), params.model)
        stage_fwd = max(timed_forward(lambda b: lm.logits(b), batch, fwd_iters) for _ in range(2))
        del lm
        free()

    def row(what, plain, stage, unit, higher_better=True):
        ratio = (stage / plain) if higher_better else (plain / stage)
        rows.append({"what": what, "plain": round(plain, 2), "stage": round(stage, 2), "unit": unit,
                     "ratio": round(ratio, 3)})

    if not args.gptq_only:
        row("forward (HF model vs LM.logits)", plain_fwd, stage_fwd, "tok/s")
        row("LoRA train (peft vs peft stage)", plain_lora, res["lora"]["train"]["tokens_per_s"], "tok/s")
    if cuda and not args.gptq_only:
        row("QLoRA train (peft+bnb vs peft stage on nf4)", plain_qlora, res["nf4-qlora"]["train"]["tokens_per_s"], "tok/s")
        row("QLoRA training peak memory", plain_qlora_peak, res["nf4-qlora"]["train"]["peak_memory_mb"] / 1024, "GiB", False)
    row("GPTQ 4-bit g128 (GPTQModel vs quantize stage)", plain_gptq_s, res["gptq"]["stage_seconds"], "s", False)
    out = {"env": env, "rows": rows, "stage_metrics": {k: {"ppl": v["ppl"], "stage_s": v["stage_seconds"],
                                                             "latency": v["latency"], "peak_mb": v["peak_memory_mb"]}
                                                         for k, v in res.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'what':48s} {'plain':>10s} {'stage':>10s} unit   ratio")
    for r in rows:
        print(f"{r['what']:48s} {r['plain']:10.2f} {r['stage']:10.2f} {r['unit']:6s} {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
