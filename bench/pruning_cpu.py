"""Pruning methods on the real default model (SmolLM2-135M) on CPU: WikiText-2 perplexity after magnitude / Wanda /
SparseGPT at 50% and 2:4 with two calibration sizes, and structured FFN pruning's perplexity and prefill / decode
speed against the dense model. One process; every variant starts from a fresh load of the base model.

    OMP_NUM_THREADS=1 python bench/pruning_cpu.py --out bench/results/pruning_cpu.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline import data
from pipeline.config import CalibrationCfg, CorpusCfg, ModelCfg, PruneCfg
from pipeline.models import LM, load_source
from pipeline.stages import prune as P
from pipeline.stages.evaluate import latency, perplexity

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def fresh() -> LM:
    model, tok = load_source(ModelCfg(), CPU)
    return LM(model, tok, None, CPU)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib", type=int, nargs="+", default=[16, 64], help="calibration samples of 256 tokens")
    ap.add_argument("--only", nargs="*", help="run only these variant names")
    ap.add_argument("--latency-rounds", type=int, default=0,
                    help="instead: prefill / decode speed of dense vs structured FFN 25% / 50%, measured in this many "
                         "interleaved rounds (a shared CPU's load drifts; interleaving spreads it over all three)")
    args = ap.parse_args()
    lm = fresh()
    wiki = CorpusCfg(files=str(ROOT / "data/wikitext2-raw-v1/wiki.test.raw"), read_as="hf_rows")
    ids = data.tokenize(lm.tokenizer, data.corpus_text(wiki), args.eval_tokens)
    calib = {n: data.calibration(lm.tokenizer, CalibrationCfg(files=str(ROOT / "data/c4-en-train-first1000/c4_sample.jsonl"),
                                                              format="json", samples=n, seq_len=256), seed=0)
             for n in args.calib}
    prompt = ids[:128]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def record(name: str, lm: LM, stage_s: float, extra: dict | None = None) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(lm, ids, args.window, batch_size=1)
        eval_s = time.perf_counter() - t0
        results[name] = {"ppl": round(ppl, 3), "stage_s": round(stage_s, 1), "eval_s": round(eval_s, 1),
                         "params": sum(p.numel() for p in lm.model.parameters()), **(extra or {})}
        print(name, results[name], flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    if args.latency_rounds:
        models = {"dense": lm}
        for frac in (0.25, 0.5):
            cfg = PruneCfg(kind="prune", method="wanda", pattern="structured", ffn_sparsity=frac)
            models[f"structured ffn {frac:.0%}"] = LM(P.structured(fresh(), cfg, calib[16])[0], lm.tokenizer, None, CPU)
        runs: dict[str, list[dict]] = {k: [] for k in models}
        for _ in range(args.latency_rounds):
            for name, m in models.items():
                runs[name].append(latency(m, prompt, new_tokens=32, repeats=3))
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        results["latency_interleaved"] = {
            name: {"prefill_tok_s": med([r["prefill_tok_s"] for r in rs]), "decode_tok_s": med([r["decode_tok_s"] for r in rs]),
                   "rounds": [[r["prefill_tok_s"], r["decode_tok_s"]] for r in rs],
                   "params": sum(p.numel() for p in models[name].model.parameters())}
            for name, rs in runs.items()}
        results["latency_interleaved"]["setup"] = (f"prompt 128 tokens, 32 new tokens, greedy with KV cache, fp32, "
                                                   f"torch threads {torch.get_num_threads()}, median of 3 per round, "
                                                   f"median over {args.latency_rounds} rounds")
        print(json.dumps(results["latency_interleaved"], indent=1))
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        return
    variants: list[tuple[str, dict, int | None]] = [("dense", {}, None)]
    for pattern in ("unstructured", "2:4"):
        kw = {"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern}
        tag = "50" if pattern == "unstructured" else "2:4"
        variants.append((f"magnitude {tag}", {"method": "magnitude", **kw}, None))
        for n in args.calib:
            for method in ("wanda", "sparsegpt"):
                variants.append((f"{method} {tag} calib {n}x256", {"method": method, **kw}, n))
    for frac in (0.25, 0.5):
        variants.append((f"structured ffn {frac:.0%} calib 16x256",
                         {"method": "wanda", "pattern": "structured", "ffn_sparsity": frac}, 16))
    for name, kw, n in variants:
        if args.only and name not in args.only:
            continue
        lm = fresh()
        t0 = time.perf_counter()
        extra = {}
        if kw.get("pattern") == "structured":
            small, info = P.structured(lm, PruneCfg(kind="prune", **kw), calib[n])
            lm = LM(small, lm.tokenizer, None, CPU)
            extra["config"] = info
        elif kw:
            extra["measured_sparsity"] = round(P.prune(lm, PruneCfg(kind="prune", **kw), calib.get(n)), 4)
        stage_s = time.perf_counter() - t0
        if name == "dense" or kw.get("pattern") == "structured":
            extra["latency"] = latency(lm, prompt, new_tokens=32, repeats=3)
        record(name, lm, stage_s, extra)


if __name__ == "__main__":
    main()
