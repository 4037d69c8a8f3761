"""Pruning: magnitude or Wanda (Sun et al. 2023) scores; unstructured per-row sparsity or N:M (e.g. 2:4).

Only the linear layers inside the decoder blocks are pruned (not embeddings or lm_head, as in the papers);
adapter / prompt modules carried from an earlier merge stay dense.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import data
from ..adapters import decoder_layers
from ..config import Params, PruneCfg
from ..models import LM, load_lm, save_hybrid, save_weights


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every base linear layer in the decoder blocks (under LoRA too: same names)."""
    return {f"{i}.{n}".replace(".base_layer", ""): m for i, layer in enumerate(decoder_layers(model))
            for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}


@torch.no_grad()
def input_norms(lm: LM, linears: dict[str, nn.Linear], calib: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all calibration tokens, per input feature j of each linear (Wanda's activation term)."""
    sq = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in linears.items()}

    def hook(name):
        def fn(_m, inp, _out):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sq[name] += (x * x).sum(0)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for ids in tqdm(calib, desc="wanda calibration", unit="sample"):
            lm.logits(ids)
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


def prune_mask(score: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Boolean keep-mask: drop the lowest scores per output row (unstructured) or per group of M inputs (N:M)."""
    out_f, in_f = score.shape
    if pattern == "unstructured":
        k = int(in_f * sparsity)
        drop = torch.topk(score, k, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    n, m = map(int, pattern.split(":"))
    if in_f % m:
        raise ValueError(f"pattern {pattern}: in_features {in_f} is not a multiple of {m}")
    groups = score.reshape(out_f, in_f // m, m)
    drop = torch.topk(groups, m - n, dim=2, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False).reshape(out_f, in_f)


@torch.no_grad()
def prune(lm: LM, cfg: PruneCfg, calib: list[torch.Tensor] | None) -> float:
    """Zero weights in place; returns the measured sparsity of the pruned layers."""
    linears = block_linears(lm.base)
    norms = input_norms(lm, linears, calib) if cfg.method == "wanda" else {}
    zeros = total = 0
    for name, lin in tqdm(linears.items(), desc=f"{cfg.method} {cfg.pattern}", unit="layer"):
        w = lin.weight
        score = w.abs().float()
        if cfg.method == "wanda":
            score = score * norms[name].unsqueeze(0)
        w.mul_(prune_mask(score, cfg.sparsity, cfg.pattern).to(w.dtype))
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def run(src: Path, cfg: PruneCfg, out: Path, params: Params) -> dict:
    lm = load_lm(src, params.model)
    calib = data.calibration(lm.tokenizer, params.data.calibration, params.seed) if cfg.method == "wanda" else None
    sparsity = prune(lm, cfg, calib)
    save_weights(lm.base, lm.tokenizer, out)
    save_hybrid(lm, out)
    return {"format": "hf", "weights": ".", "prune": {"measured_sparsity": round(sparsity, 4)}}
