"""The fused loss on CPU against the plain HF loss, on the real default model: SmolLM2-135M (fp32), LoRA r=8 q/v,
6 training steps of 4 x 256 tinyshakespeare tokens. Run each variant in a fresh process (max RSS cannot be reset):

    OMP_NUM_THREADS=1 python bench/fused_loss_cpu.py plain
    OMP_NUM_THREADS=1 python bench/fused_loss_cpu.py fused
"""
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import data  # noqa: E402
from pipeline.config import DomainCfg, ModelCfg, PeftCfg  # noqa: E402
from pipeline.models import LM, load_source  # noqa: E402
from pipeline.stages.peft import add_peft  # noqa: E402

fused = sys.argv[1:] == ["fused"]
model, tok = load_source(ModelCfg(), torch.device("cpu"))
for p in model.parameters():
    p.requires_grad_(False)
lm = LM(model, tok, None, torch.device("cpu"))
params = add_peft(lm, PeftCfg(kind="peft", methods=["lora"]), 0)
domain = DomainCfg(files=str(ROOT / "data" / "tinyshakespeare" / "input.txt"))
ids = data.tokenize(tok, data.domain_split(domain)[0][:200_000])
batches = list(data.train_batches(ids, 256, 4, 6, 0))
opt = torch.optim.AdamW(params, lr=1e-3)
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times, losses = [], []
for b in batches:
    t = time.perf_counter()
    loss = lm.loss(b, fused=fused)
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
    losses.append(round(loss.item(), 5))
step_s = sorted(times[1:])[len(times[1:]) // 2]
print(f"{lm.loss_impl(fused)}: median step {step_s:.3f} s ({1024 / step_s:.0f} tok/s), max RSS "
      f"{rss_loaded:.0f} MB loaded -> {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; losses {losses}")
