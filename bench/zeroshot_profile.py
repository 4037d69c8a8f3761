"""Where a node's zero-shot evaluation spends its time: params-gpu.yaml's 9 tasks x 500 items through
pipeline.zeroshot.evaluate_zeroshot (lm-eval) on a tiny random Llama with the default tokenizer's vocabulary, so that
the host side (task loading, request building, tokenization, lm-eval's bookkeeping) shows beside a model that costs
little. Runs it once to warm the process, then once under cProfile; prints both wall times and the functions of
largest cumulative time.

    python bench/zeroshot_profile.py --out bench/results/zeroshot_profile_cpu.txt      # CPU, ~1 min
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelCfg, load_params  # noqa: E402
from pipeline.models import LM, load_base, make_tiny_llama  # noqa: E402
from pipeline.zeroshot import evaluate_zeroshot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/zeroshot_profile"), help="scratch dir for the model")
    ap.add_argument("--out", type=Path, default=None, help="text file for the timings and the profile")
    args = ap.parse_args()
    model_dir = args.work / "llama"
    if not (model_dir / "config.json").exists():
        make_tiny_llama(model_dir, (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[:200_000])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_base(model_dir, "fp", ModelCfg(source=str(model_dir), device=device.type), device)
    lm = LM(model.eval(), tok, None, device)
    ev = load_params(ROOT / "params-gpu.yaml").evaluate
    tasks = dict(ev.zeroshot)
    t = time.perf_counter()
    evaluate_zeroshot(lm, tasks, batch_size=ev.zeroshot_batch_size)
    first = time.perf_counter() - t
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    evaluate_zeroshot(lm, tasks, batch_size=ev.zeroshot_batch_size)
    prof.disable()
    second = time.perf_counter() - t
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
    text = (f"{device.type}, tasks {tasks}, batch {ev.zeroshot_batch_size}\nfirst call {first:.2f} s, second "
            f"(profiled) {second:.2f} s\n" + s.getvalue())
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
