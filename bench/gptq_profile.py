"""Where the quantize stage's GPTQ time goes on the Llama-3.2-1B shape (random weights, the calibration of
bench/gpu_stages.py --gptq-only: 64 x 512 tokens of C4, 4-bit g128): the stage once to warm the process (Triton and
cuBLAS first-use costs, as GPTQModel's timed run had them too), then once under cProfile. Prints the stage's parts
and the functions of largest cumulative time.

    python3 bench/gptq_profile.py --out $OUT/gptq_profile.txt      # on the GPU
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_stages import make_model  # noqa: E402
from pipeline.config import parse_params  # noqa: E402
from pipeline.runner import artifact_path, run_node  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptq_profile"))
    ap.add_argument("--out", type=Path, default=Path("gptq_profile.txt"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "smollm2-135m"], help="model shape")
    ap.add_argument("--calib", type=int, nargs=2, default=[64, 512], metavar=("SAMPLES", "SEQ_LEN"),
                    help="calibration windows (the GPU profile's trie uses 128 2048)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="GPTQ group size (default 128; 64 for the 135M shape, whose 576 columns 128 does not divide)")
    args = ap.parse_args()
    args.group_size = args.group_size or (64 if args.shape == "smollm2-135m" else 128)
    cuda = torch.cuda.is_available() and not args.tiny
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").unlink(missing_ok=True)
    (work / "data").symlink_to(ROOT / "data")
    os.chdir(work)
    model_dir = make_model(work / "model", "tiny" if args.tiny else args.shape, torch.bfloat16 if cuda else torch.float32)
    n, length = (4, 64) if args.tiny else args.calib
    params = parse_params({
        "model": {"source": str(model_dir), "dtype": "bfloat16" if cuda else "float32", "device": "cuda" if cuda else "cpu"},
        "data": {"calibration": {"files": "data/c4-en-train-first1000/c4_sample.jsonl", "format": "json",
                                 "samples": n, "seq_len": length},
                 "domain": {"files": "data/tinyshakespeare/input.txt"},
                 "eval": {"wikitext2": {"files": "data/wikitext2-raw-v1/wiki.test.raw"}}},
        "stages": {"gptq": {"kind": "quantize", "method": "gptq", "group_size": args.group_size}},
        "orderings": {"gptq": ["gptq"]},
    })
    run_node("base", params, evaluate=False)
    lines = []
    for label in ("warm", "profiled"):
        shutil.rmtree(artifact_path("gptq"), ignore_errors=True)
        prof = cProfile.Profile() if label == "profiled" else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        info = run_node("gptq", params, force=True, evaluate=False)["stage_info"]
        if prof:
            prof.disable()
        lines.append(f"{label}: {time.perf_counter() - t:.2f} s, parts {info.get('seconds')}")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    t = io.StringIO()
    pstats.Stats(prof, stream=t).sort_stats("tottime").print_stats(25)
    lines.insert(0, f"shape {args.shape}, calibration {n} x {length}, g{args.group_size}, {torch.cuda.get_device_name() if cuda else 'cpu'}")
    text = "\n".join(lines) + "\n" + s.getvalue() + "\n" + t.getvalue()
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
