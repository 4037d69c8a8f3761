"""CPU forward time of a GPTQ node against the fp node it was quantized from (one 256-token sequence, fp32
activations, the kernel transformers + GPTQModel pick on CPU), both in one run; after a warm-up, mean of two.

    python bench/gptq_cpu_forward.py artifacts/hybrid-merge artifacts/nf4-hybrid-merge-gptq4
"""
from __future__ import annotations

import sys
import time

import torch
from transformers import AutoModelForCausalLM

ids = torch.randint(100, 20000, (1, 256), generator=torch.Generator().manual_seed(0))
times = {}
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"}).eval()
    with torch.no_grad():
        model(ids)
        t0 = time.perf_counter()
        model(ids), model(ids)
    times[path] = (time.perf_counter() - t0) / 2
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}) or ["dense"]
    print(f"{path}: {times[path]:.2f} s per 256-token forward ({', '.join(kernels)}; "
          f"x{times[path] / times[sys.argv[1]]:.2f} the first)", flush=True)
