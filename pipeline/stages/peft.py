"""Hybrid PEFT: LoRA on attention (peft), a bottleneck adapter after each MLP and a soft prompt (adapters.py),
any subset of the three, trained together on the domain corpus. The single-method baselines are this same code
with one method. Works over fp, sparse and NF4 bases (QLoRA); PEFT parameters stay fp32.

The artifact holds only the PEFT parts: its base weights are referenced from the parent, never copied.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import artifact, data
from ..adapters import Hybrid
from ..config import Params, PeftCfg
from ..models import LM, load_lm
from .evaluate import peak_memory_mb, reset_peak_memory


def add_peft(lm: LM, cfg: PeftCfg, seed: int) -> list[torch.nn.Parameter]:
    """Attach the selected PEFT parts to `lm`; returns the trainable parameters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if "lora" in cfg.methods:
        lm.model = get_peft_model(lm.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                       target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    if "adapter" in cfg.methods or "prompt" in cfg.methods:
        config = lm.base.config
        init = None
        if "prompt" in cfg.methods:
            vocab = lm.model.get_input_embeddings().weight
            init = vocab[torch.randint(0, min(vocab.shape[0], 5000), (cfg.prompt_tokens,))].detach().float()
        lm.hybrid = Hybrid(config.hidden_size, config.num_hidden_layers,
                           cfg.adapter_dim if "adapter" in cfg.methods else None,
                           cfg.prompt_tokens if "prompt" in cfg.methods else None, init,
                           adapter_act=cfg.adapter_act).to(lm.device)
        lm.hybrid.attach(lm.model)
    trainable = [p for p in lm.model.parameters() if p.requires_grad]
    return trainable + (list(lm.hybrid.parameters()) if lm.hybrid else [])


def train(lm: LM, params_: list[torch.nn.Parameter], cfg: PeftCfg, ids: torch.Tensor, seed: int) -> dict:
    """AdamW on the PEFT parameters; timed from the first step (tokenization is done before)."""
    opt = torch.optim.AdamW(params_, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.steps // 10)))
    lm.model.train()
    losses: list[float] = []
    reset_peak_memory(lm.device)
    t0 = time.perf_counter()
    bar = tqdm(data.train_batches(ids, cfg.seq_len, cfg.batch_size, cfg.steps, seed),
               total=cfg.steps, desc=f"train {'+'.join(cfg.methods)}", unit="step")
    for batch in bar:
        loss = lm.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {len(losses) + 1} (diverged, or a corrupt "
                                     f"base); lower stages.<name>.lr or rebuild the parent node")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    lm.model.eval()
    k = max(1, len(losses) // 5)
    return {"steps": cfg.steps, "seconds": round(seconds, 2),
            "tokens_per_s": round(cfg.steps * cfg.batch_size * cfg.seq_len / seconds, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
            "trainable_params": sum(p.numel() for p in params_), "peak_memory_mb": peak_memory_mb(lm.device)}


def save_peft(lm: LM, peft: Path) -> None:
    if hasattr(lm.model, "peft_config"):
        lm.model.save_pretrained(peft / "lora", safe_serialization=True)
    if lm.hybrid is not None:
        lm.hybrid.save(peft)


def run(src: Path, cfg: PeftCfg, out: Path, params: Params) -> dict:
    """Train once per seed. The first seed's parts are the node's (peft/, what children build on); the others are
    kept beside them (peft/seeds/<seed>/), so evaluation reports the spread over seeds, not one lucky run."""
    seeds = cfg.seeds or [params.seed]
    runs = []
    for i, seed in enumerate(seeds):
        lm = load_lm(src, params.model)
        trainable = add_peft(lm, cfg, seed)
        ids = data.tokenize(lm.tokenizer, data.domain_split(params.data.domain)[0])
        runs.append({"seed": seed, **train(lm, trainable, cfg, ids, seed)})
        peft = artifact.peft_dir(out)
        save_peft(lm, peft if i == 0 else artifact.seed_dir(out, seed))
        del lm, trainable
    fmt = artifact.read_manifest(src)["format"]
    info = {"format": fmt, "weights": os.path.relpath(artifact.weights_dir(src), out.resolve()), "train": runs[0]}
    if len(runs) > 1:
        info["train_seeds"] = runs
    return info
