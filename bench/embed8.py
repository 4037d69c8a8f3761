"""What 8-bit embeddings would cost in quality: each node's input embedding (tied to the lm_head in SmolLM2, so
both) rounded to int8 per row by the quantize stage's own code (store_int8_embedding: symmetric absmax, one float16
scale per row), then the pipeline's perplexity evaluation (params.yaml's corpora and budgets), against the node
unchanged, paired per window (the same windows), so the difference has an interval the single numbers do not.

    python bench/embed8.py artifacts/base artifacts/nf4-hybrid-merge-gptq4 --out bench/results/embed8.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.models import load_lm  # noqa: E402
from pipeline.stages.evaluate import corpus_nlls  # noqa: E402
from pipeline.stages.quantize import store_int8_embedding  # noqa: E402
from pipeline.stats import paired_ppl_diff  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nodes", nargs="+", type=Path, help="artifact folders")
    ap.add_argument("-p", "--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embed8.json")
    args = ap.parse_args()
    params = load_params(args.params)
    rows = []
    for node in args.nodes:
        lm = load_lm(node, params.model)
        emb = lm.model.get_input_embeddings().weight
        tied = emb.data_ptr() == lm.base.get_output_embeddings().weight.data_ptr()
        before, _ = corpus_nlls(lm, params)
        with tempfile.TemporaryDirectory() as tmp:  # the stage's own rounding (embeddings: int8), its file thrown away
            store_int8_embedding(lm.model, Path(tmp))
        after, _ = corpus_nlls(lm, params)
        n_emb = emb.numel()
        row = {"node": node.name, "tied": tied, "embedding_params": n_emb}
        for corpus in before:
            a, b = before[corpus], after[corpus]
            ppl_a, ppl_b = math.exp(sum(a) / len(a)), math.exp(sum(b) / len(b))
            row[corpus] = {"ppl": round(ppl_a, 3), "ppl_int8_embedding": round(ppl_b, 3),
                           "diff_ci95": paired_ppl_diff(a, b).as_list(), "windows": len(a)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del lm
    args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "params": args.params,
                                    "nodes": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
