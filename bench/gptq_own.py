"""Our GPTQ pass vs GPTQModel 7.6 on the default model (SmolLM2-135M), CPU, at params.yaml's gptq4 settings.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gptq_own.py --artifacts ../main/artifacts [--runs ...] [--keep]

Sources: the built `base`, `hybrid` (unmerged LoRA + adapters + soft prompt) and `hybrid-merge` artifacts (read only).
Each quantization runs the stage method as a node would (its seconds: load, calibrate, quantize, pack, save); the
perplexities are of the fp model holding exactly the checkpoint's weights (`quantize.roundtrip_error` checks that
for our checkpoints), with the node's PEFT parts attached, on the pipeline's eval corpora and windows.
  1. GPTQModel vs ours on base and on hybrid-merge (its adapters + prompt active while ours calibrates).
  2. [hybrid, gptq4]: the base quantized under the hybrid's unmerged PEFT parts, calibrated with them active (ours on
     `hybrid`) vs on the base alone (ours and GPTQModel on `base`), all evaluated with the PEFT parts on.
  3. Ablations on base: ours with group-aware reordering and / or true-sequential off (which of GPTQModel's walk
     defaults matters).
Writes bench/results/gptq_own_cpu.json.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from pipeline import artifact, data
from pipeline.config import PtqCfg, load_params
from pipeline.models import LM, device_of, with_peft
from pipeline.stages import quantize as q
from pipeline.stages.evaluate import window_nlls

OUT = Path(__file__).parent / "results" / "gptq_own_cpu.json"
# name -> (stage method, source node). own-*: our pass with one of GPTQModel's walk defaults off (which one mattered)
RUNS = {"gptqmodel:base": (q.gptqmodel, "base"), "own:base": (q.gptq_own, "base"),
        "own-no-gar:base": (functools.partial(q.gptq_own, group_aware=False), "base"),
        "own-no-true-sequential:base": (functools.partial(q.gptq_own, true_sequential=False), "base"),
        "own-neither:base": (functools.partial(q.gptq_own, group_aware=False, true_sequential=False), "base"),
        "gptqmodel:hybrid-merge": (q.gptqmodel, "hybrid-merge"), "own:hybrid-merge": (q.gptq_own, "hybrid-merge"),
        "own:hybrid": (q.gptq_own, "hybrid")}


def ppl(model: torch.nn.Module, tok, peft: Path | None, texts: dict[str, str], params, max_tokens: int) -> dict:
    """Perplexity per corpus of `model` with the PEFT parts of `peft` (a copy: LoRA is injected in place)."""
    device = device_of(params.model)
    lm = with_peft(copy.deepcopy(model), tok, peft, device) if peft else LM(model.eval(), tok, None, device)
    out = {}
    for name, text in texts.items():
        nll = window_nlls(lm, data.tokenize(tok, text, max_tokens), params.evaluate.seq_len, params.evaluate.batch_size)
        out[name] = {"ppl": round(math.exp(sum(nll) / len(nll)), 4), "nll_per_window": [round(x, 5) for x in nll]}
    if lm.hybrid is not None:
        lm.hybrid.detach()
    return out


def quantized(method, src: Path, cfg: PtqCfg, params, check: bool) -> tuple[torch.nn.Module, float, dict | None]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        reference = method(src, cfg, Path(tmp), params)
        seconds = time.perf_counter() - t0
        err = q.roundtrip_error(reference, Path(tmp), "gptq", params) if check else None
    return reference, round(seconds, 1), err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=None, help="per corpus; default params.evaluate.max_tokens")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--keep", action="store_true", help="keep the runs already in --out (those not rerun)")
    args = ap.parse_args()
    params = load_params("params.yaml")
    cfg = params.stages["gptq4"]
    max_tokens = args.max_tokens or params.evaluate.max_tokens
    texts = data.eval_texts(params.data)
    src = {n: (args.artifacts / n).resolve() for n in ("base", "hybrid", "hybrid-merge")}
    result = {"model": params.model.source, "config": cfg.model_dump(), "device": str(device_of(params.model)),
              "threads": torch.get_num_threads(), "calibration": params.data.calibration.model_dump(),
              "eval": {"seq_len": params.evaluate.seq_len, "max_tokens": max_tokens, "corpora": list(texts)},
              "runs": json.loads(args.out.read_text())["runs"] if args.keep and args.out.exists() else {}}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src["base"])
    result["fp"] = {}
    for n, path in src.items():  # unquantized, for scale (hybrid-merge holds its own, LoRA-folded weights)
        fp = AutoModelForCausalLM.from_pretrained(artifact.weights_dir(path), dtype=torch.float32).eval()
        result["fp"][n] = ppl(fp, tok, artifact.peft_dir(path) if n != "base" else None, texts, params, max_tokens)
    for run in args.runs:
        fn, node = RUNS[run]
        reference, seconds, err = quantized(fn, src[node], cfg, params, check=not run.startswith("gptqmodel"))
        evals = {node: ppl(reference, tok, artifact.peft_dir(src[node]) if node != "base" else None, texts, params,
                           max_tokens)}
        if node == "base":  # the base quantized alone, deployed under the hybrid's unmerged PEFT parts
            evals["hybrid"] = ppl(reference, tok, artifact.peft_dir(src["hybrid"]), texts, params, max_tokens)
        result["runs"][run] = {"seconds": seconds, "roundtrip": err, "eval": evals}
        print(run, seconds, {k: {c: v[c]["ppl"] for c in v} for k, v in evals.items()}, flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
