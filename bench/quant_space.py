"""The quantization space on one model: RTN vs GPTQ settings (bits, group, sym, act-order, damping), NF4 and LLM.int8,
all at the same calibration and the same WikiText-2 evaluation. Prints a table last; writes JSON (with the command).

    python bench/quant_space.py                                              # GPU: SmolLM2-135M, bf16, 128 x 2048 calib
    OMP_NUM_THREADS=1 python bench/quant_space.py --only rtn4_g64,gptq4_g64 \\
        --calib-samples 8 --calib-len 256 --eval-tokens 2048                  # a CPU check (< 5 min on 2 cores)

Rows already in --out are kept and skipped (so a long sweep can be split over several calls); --redo reruns them.
Each row reuses the stage code: quantize.METHODS (the quantize / ptq stage), its round-trip check, models.load_base
(how every later stage loads the artifact) and evaluate.window_nlls (the pipeline's perplexity).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import artifact, checks, data  # noqa: E402
from pipeline.config import QuantizeCfg, parse_params, storage_format  # noqa: E402
from pipeline.models import DEFAULT_MODEL, LM, default_hf_dir, device_of, dtype_of, load_base  # noqa: E402
from pipeline.plan import PlanError  # noqa: E402
from pipeline.stages import evaluate  # noqa: E402
from pipeline.stages import quantize as q  # noqa: E402


def settings() -> dict[str, dict | None]:
    """Row name -> quantize stage params (None = the fp model). Each GPTQ row changes one knob from gptq{b}_g64."""
    rows: dict[str, dict | None] = {"fp": None, "nf4": {"method": "nf4"}, "int8": {"method": "int8"}}
    for b in (4, 3):
        for g in (64, 128, -1):
            rows[f"rtn{b}_g{g}".replace("-1", "pc")] = {"method": "rtn", "bits": b, "group_size": g}
            rows[f"gptq{b}_g{g}".replace("-1", "pc")] = {"method": "gptq", "bits": b, "group_size": g}
        rows[f"rtn{b}_g64_asym"] = {"method": "rtn", "bits": b, "group_size": 64, "sym": False}
        rows[f"gptq{b}_g64_asym"] = {"method": "gptq", "bits": b, "group_size": 64, "sym": False}
        rows[f"gptq{b}_g64_act"] = {"method": "gptq", "bits": b, "group_size": 64, "desc_act": True}
        rows[f"gptq{b}_g64_damp01"] = {"method": "gptq", "bits": b, "group_size": 64, "damp_percent": 0.01}
        # the best llm-compressor setting measured in the issue (asym + act-order): two knobs at once
        rows[f"gptq{b}_g64_asym_act"] = {"method": "gptq", "bits": b, "group_size": 64, "sym": False, "desc_act": True}
    return rows


def make_params(args) -> object:
    d = ROOT / "data"
    return parse_params({
        "seed": 0,
        "model": {"source": args.model, "dtype": "bfloat16", "device": "auto", "gptq_kernel": args.gptq_kernel},
        "data": {
            "calibration": {"files": str(d / "c4-en-train-first1000/c4_sample.jsonl"), "format": "json",
                            "samples": args.calib_samples, "seq_len": args.calib_len},
            "domain": {"files": str(d / "tinyshakespeare/input.txt")},
            "eval": {"wikitext2": {"files": str(d / "wikitext2-raw-v1/wiki.test.raw"), "read_as": "hf_rows"}},
        },
        "stages": {"q": {"kind": "quantize", "method": "nf4"}},
        "orderings": {"o": ["q"]},
    }, Path("bench/quant_space.py"))


def skip_reason(name: str, cfg: QuantizeCfg, params, linears: dict[str, int]) -> str | None:
    """The plan-time checks a pipeline run would make: a group that does not divide a layer, no kernel to load it."""
    if cfg.method in ("gptq", "rtn"):
        bad = [f for f in linears.values() if cfg.group_size > 0 and f % cfg.group_size]
        if bad:
            return f"group_size {cfg.group_size} does not divide in_features {bad[0]}"
        try:
            checks._check_gptq_kernel(name, cfg, params.model)
        except PlanError as exc:
            return str(exc)
    return None


def as_source(weights: Path, where: Path) -> Path:
    """A plain HF model dir as the quantize stage's source: a folder of links to its files plus a manifest that says
    the weights are its own (the stage reads nothing else of a parent without PEFT parts)."""
    where.mkdir(parents=True, exist_ok=True)
    for f in weights.iterdir():
        if not (where / f.name).exists():
            (where / f.name).symlink_to(f.resolve())
    artifact.write_json(where / artifact.MANIFEST, {"schema_version": artifact.SCHEMA_VERSION, "weights": "."})
    return where


def run_row(name: str, spec: dict | None, params, weights: Path, ids: torch.Tensor, args) -> dict:
    device = device_of(params.model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        out.mkdir()
        row: dict = {"name": name, "params": spec}
        if spec is None:
            fmt, out = "hf", weights
        else:
            cfg = QuantizeCfg(kind="quantize", **spec)
            fmt = storage_format(cfg)
            reference = q.METHODS[cfg.method](as_source(weights, Path(tmp) / "src"), cfg, out, params)
            row["quantize_s"] = round(time.perf_counter() - t0, 1)
            row["roundtrip"] = q.roundtrip_error(reference, out, fmt, params)
            del reference
        model, tok = load_base(out, fmt, params.model, device)
        lm = LM(model, tok, None, device)
        kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight") or "bit" in type(m).__name__.lower()})
        n_params = evaluate.param_stats(lm)["total"]  # before any forward: CPU TorchFusedLinear repacks on its first
        nll = evaluate.window_nlls(lm, ids, args.seq_len, args.batch_size, desc=name)
        weight_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        row.update({"kernels": kernels, "ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll,
                    "bytes": weight_bytes, "mb": round(weight_bytes / 2**20, 2),
                    "bits_per_weight": round(8 * weight_bytes / n_params, 3), "n_params": n_params,
                    "seconds": round(time.perf_counter() - t0, 1)})
        del model, lm
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2-135m' or a local HF model dir")
    gpu = torch.cuda.is_available()
    ap.add_argument("--calib-samples", type=int, default=128 if gpu else 8)
    ap.add_argument("--calib-len", type=int, default=2048 if gpu else 256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window (non-overlapping)")
    ap.add_argument("--batch-size", type=int, default=16 if gpu else 1)
    ap.add_argument("--gptq-kernel", default="torch", help="GPTQModel kernel on GPU (model.gptq_kernel): torch loads "
                    "every bits / group setting (triton has no 3-bit kernel); perplexity does not depend on it")
    ap.add_argument("--only", default="", help="comma-separated row names (default: all); see settings()")
    ap.add_argument("--redo", action="store_true", help="rerun rows already in --out")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant_space.json")
    args = ap.parse_args()

    params = make_params(args)
    device = device_of(params.model)
    weights = default_hf_dir(dtype_of(params.model, device)) if args.model == DEFAULT_MODEL else Path(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weights)
    ids = data.tokenize(tok, data.corpus_text(params.data.eval["wikitext2"]), args.eval_tokens)
    linears = checks.block_linears(checks.model_config(args.model))
    rows = settings()
    wanted = [n for n in args.only.split(",") if n] or list(rows)
    unknown = sorted(set(wanted) - set(rows))
    if unknown:
        sys.exit(f"--only: unknown row(s) {unknown}; choose from {', '.join(rows)}")
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    setup = {"model": args.model, "device": str(device), "dtype": str(dtype_of(params.model, device)),
             "calibration": f"{args.calib_samples} x {args.calib_len} tokens, C4 (seed 0)",
             "eval": f"WikiText-2 raw test (HF rows), first {ids.numel()} tokens, {args.seq_len}-token windows"}
    results = old.get("rows", {}) if old.get("setup") == setup else {}
    for name in wanted:
        if name in results and not args.redo:
            continue
        spec = rows[name]
        why = skip_reason(name, QuantizeCfg(kind="quantize", **spec), params, linears) if spec else None
        results[name] = {"name": name, "params": spec, "skipped": why} if why else run_row(name, spec, params, weights, ids, args)
        print(f"{name}: " + (f"skipped ({why})" if why else f"ppl {results[name]['ppl']:.3f}, {results[name]['mb']} MB, "
                             f"{results[name]['seconds']} s"), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(map(shlex.quote, sys.argv)), "setup": setup,
                                        "libraries": artifact.library_versions(), "rows": results}, indent=1))
    fp = results.get("fp")
    print(f"\n{setup['eval']}; calibration {setup['calibration']}; {setup['device']} {setup['dtype']}")
    print(f"{'row':22} {'ppl':>9} {'vs fp':>7} {'MB':>7} {'bits/w':>7} {'quant s':>8}  kernels")
    for name in [n for n in rows if n in results]:
        r = results[name]
        if r.get("skipped"):
            print(f"{name:22} {'skipped':>9}  {r['skipped'][:90]}")
            continue
        rel = f"{r['ppl'] / fp['ppl']:.3f}" if fp and "ppl" in fp else ""
        print(f"{name:22} {r['ppl']:9.3f} {rel:>7} {r['mb']:7.1f} {r['bits_per_weight']:7.2f} "
              f"{r.get('quantize_s', 0):8.1f}  {','.join(r['kernels'])}")


if __name__ == "__main__":
    main()
