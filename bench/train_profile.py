"""Where one PEFT training step's GPU time goes: the hybrid config of params-gpu.yaml (LoRA q/v + adapters + soft
prompt) on the SmolLM2-135M shape (random weights, bf16, 8 x 512), the step the CUDA graph records (HF loss,
backward, clipping, AdamW), run eagerly under torch.profiler. Prints the wall time of a step, the summed kernel time
of a step (if it is near the wall time, the GPU is busy and more processes cannot add throughput; if far below, the
step is bound by launches or the host), and the kernels of largest total time. The whole trie's 9 trainings add up
to ~106k tok/s whatever their number at once (bench/results/README.md, stop 9): this says why.

    python3 bench/train_profile.py --out $OUT/train_profile.txt      # on the GPU
    python3 bench/train_profile.py --tiny                             # CPU check of the script
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import data  # noqa: E402
from pipeline.config import PeftCfg  # noqa: E402
from pipeline.models import LM  # noqa: E402
from pipeline.stages.peft import add_peft  # noqa: E402
from train_speed import random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    ap.add_argument("--methods", default="lora,adapter,prompt", help="PEFT methods (comma-separated)")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (after 5 untimed)")
    ap.add_argument("--out", type=Path, default=Path("train_profile.txt"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    shape, batch, seq = ("smollm2-135m", 8, 512) if not args.tiny else ("tiny", 2, 64)
    cfg = PeftCfg(kind="peft", methods=args.methods.split(","), steps=args.steps, batch_size=batch, seq_len=seq)
    lm = LM(random_model(shape, device, dtype, 0).eval(), None, None, device)
    params = add_peft(lm, cfg, 0)
    lm.model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    vocab = lm.base.config.vocab_size

    def step() -> None:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        loss = lm.loss(data.Batch.of(ids))  # the HF loss, as the recorded step uses
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t) / args.steps * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernel_ms = sum(getattr(e, attr) for e in events if (e.device_type.name == "CUDA") == cuda) / 1e3 / args.steps
    launches = sum(e.count for e in events if cuda and e.device_type.name == "CUDA") / args.steps
    lines = [f"shape {shape}, batch {batch} x {seq}, methods {args.methods}, {device.type} {dtype}",
             f"wall per step (unprofiled): {wall_ms:.2f} ms = {batch * seq / wall_ms * 1e3:,.0f} tok/s",
             f"summed {'kernel' if cuda else 'op'} time per step: {kernel_ms:.2f} ms"
             + (f" ({launches:.0f} kernels a step; GPU busy {kernel_ms / wall_ms:.0%} of the eager step)" if cuda else ""),
             "", prof.key_averages().table(sort_by=attr, row_limit=25, max_name_column_width=70)]
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
