"""GPTQ's column walk on GPU: eager, one linear at a time (the pass of stop 7) vs linears sharing an input solved as
one matrix, eager and as the pipeline walks on CUDA (one Triton kernel per block, pipeline/gptq_triton.py); checks
the kernel gives exactly the eager joint walk's integers and weights, and the joint walk each linear's own.

    python3 bench/gptq_walk.py --out $OUT/gptq_walk.json        # on the H200

Shapes: one decoder layer of SmolLM2-135M and of Llama-3.2-1B (random weights, correlated random inputs: the speed of
the walk does not depend on trained values), 4-bit g64 asym with group-aware reordering, the default gptq4; seconds
per layer (median of 3) and for the whole model (x its layers). Prints a short table last. (Until code 60012df this
was bench/gptq_graph.py, with a third mode: the walk replayed from one CUDA graph per block.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import gptq  # noqa: E402
from pipeline.gptq import GPTQ, quantize_together  # noqa: E402

# (name, layers, groups of (rows per linear), in_features): the input groups of one llama decoder layer
SHAPES = {
    "smollm2-135m": (30, [([576, 192, 192], 576), ([576], 576), ([1536, 1536], 576), ([576], 1536)]),
    "llama-3.2-1b": (16, [([2048, 512, 512], 2048), ([2048], 2048), ([8192, 8192], 2048), ([2048], 8192)]),
}


def eager_walk_block(W1, Hinv1, S, Z, bits):
    """walk_block's eager branch, on any device (the bench's baseline)."""
    W1 = W1.clone()
    Q1, C1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    gptq._walk(W1, Hinv1, S, Z, bits, Q1, C1, Err1)
    return Q1, C1, Err1


def solvers(rows: list[int], cols: int, x: torch.Tensor, seed: int) -> list[GPTQ]:
    g = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    for r in rows:
        lin = nn.Linear(cols, r, bias=False, device=x.device)
        lin.weight.data = torch.randn(r, cols, generator=g, device=x.device) * 0.02
        s = GPTQ(lin)
        s.add_batch(x)
        out.append(s)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(mode: str, rows: list[int], cols: int, x: torch.Tensor, seed: int):
    """(seconds, results) of one input group's walk: separate (one linear at a time) or joint; eager, or triton (the
    pipeline's walk_block, one kernel per block)."""
    gptq.walk_block = pipeline_walk_block if mode.endswith("triton") else eager_walk_block
    ss = solvers(rows, cols, x, seed)
    sync()
    t0 = time.perf_counter()
    if mode.startswith("separate"):
        res = [quantize_together([s], 4, 64, False, False, percdamp=0.05)[0] for s in ss]
    else:
        res = quantize_together(ss, 4, 64, False, False, percdamp=0.05)
    sync()
    return time.perf_counter() - t0, res


pipeline_walk_block = gptq.walk_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="model shapes")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = ["separate eager", "joint eager"] + (["joint triton"] if device.type == "cuda" and gptq.gptq_triton else [])
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "setting": "4-bit g64 asym, GAR, damp 0.05, blocksize 128", "shapes": {}}
    for shape in args.shapes:
        layers, groups = SHAPES[shape]
        per_mode = {m: 0.0 for m in modes}
        checks = []
        for gi, (rows, cols) in enumerate(groups):
            g = torch.Generator(device=device).manual_seed(gi)
            mix = torch.randn(cols, cols, generator=g, device=device) / cols ** 0.5 + torch.eye(cols, device=device)
            x = torch.randn(4096, cols, generator=g, device=device) @ mix
            results = {}
            for m in modes:
                run(m, rows, cols, x, gi)  # warm-up (and the kernel's compilation)
                times = []
                for _ in range(args.repeats):
                    t, results[m] = run(m, rows, cols, x, gi)
                    times.append(t)
                per_mode[m] += statistics.median(times)
            # exactness: the kernel gives the eager joint walk's numbers; the joint walk is each linear's own walk
            same_triton = "joint triton" not in results or all(
                torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
                for a, b in zip(results["joint triton"], results["joint eager"]))
            codes_triton_vs_eager = sum(int((a.codes != b.codes).sum()) for a, b in
                                        zip(results.get("joint triton", []), results["joint eager"]))
            codes_joint_vs_separate = sum(int((a.codes != b.codes).sum()) for a, b in
                                          zip(results["joint eager"], results["separate eager"]))
            checks.append({"rows": rows, "cols": cols, "triton_equals_eager": same_triton,
                           "codes_differing_triton_vs_eager": codes_triton_vs_eager,
                           "codes_differing_joint_vs_separate": codes_joint_vs_separate,
                           "codes": sum(r * cols for r in rows)})
        out["shapes"][shape] = {"layers": layers, "per_layer_s": {m: round(v, 4) for m, v in per_mode.items()},
                                "model_s": {m: round(v * layers, 2) for m, v in per_mode.items()},
                                "speedup_vs_separate_eager": {m: round(per_mode["separate eager"] / v, 2)
                                                              for m, v in per_mode.items()},
                                "checks": checks}
    gptq.walk_block = pipeline_walk_block
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'shape':14s} {'mode':16s} {'s/layer':>8s} {'s/model':>8s} {'x separate':>10s}")
    for shape, r in out["shapes"].items():
        for m in modes:
            print(f"{shape:14s} {m:16s} {r['per_layer_s'][m]:8.3f} {r['model_s'][m]:8.1f} "
                  f"{r['speedup_vs_separate_eager'][m]:10.2f}")
        print(f"{shape:14s} checks: " + "; ".join(f"{c['rows']}x{c['cols']}: triton==eager {c['triton_equals_eager']} "
                                                  f"({c['codes_differing_triton_vs_eager']} codes differ), "
                                                  f"codes joint!=separate {c['codes_differing_joint_vs_separate']}"
                                                  f"/{c['codes']}" for c in r["checks"]))


if __name__ == "__main__":
    main()
