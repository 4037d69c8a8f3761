"""Pruning: magnitude, Wanda (Sun et al. 2023) or SparseGPT (Frantar & Alistarh 2023); unstructured per-row
sparsity or N:M (e.g. 2:4), both kept in dense checkpoints; or structured: whole FFN channels and KV head groups
removed, the same count in every layer, giving a smaller standard config.

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
from ..hessian import sequential
from ..models import LM, load_lm, save_hybrid, save_weights
from ..sparsegpt import SparseGPT


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
def sparsegpt(lm: LM, cfg: PruneCfg, calib: list[torch.Tensor]) -> None:
    """SparseGPT, sequential as in the paper: each decoder layer's Hessians come from calibration inputs that went
    through the already-pruned earlier layers; all linears of a layer are pruned from one pass (the reference code)."""
    sequential(lm, calib, SparseGPT, lambda group: [s.prune(cfg.sparsity, cfg.nm, cfg.blocksize, cfg.damp) for s in group.values()],
               f"sparsegpt {cfg.pattern}")


# ---------------------------------------------------------------- structured
def structured_sizes(config: dict, cfg: PruneCfg) -> dict:
    """The config fields a structured prune changes, computed from the model config alone (plan time too).
    Raises ValueError naming the params field when the request cannot be met."""
    inter, heads = config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    mult = cfg.channel_multiple
    keep = round(inter * (1 - cfg.ffn_sparsity) / mult) * mult if cfg.ffn_sparsity else inter
    if cfg.ffn_sparsity and not 0 < keep < inter:
        raise ValueError(f"ffn_sparsity: {cfg.ffn_sparsity} of intermediate_size {inter} keeps {keep} channels in "
                         f"multiples of channel_multiple {mult}; choose ffn_sparsity so that 0 < kept < {inter}, or a "
                         f"smaller channel_multiple")
    if cfg.head_groups >= kv:
        raise ValueError(f"head_groups: {cfg.head_groups} asked for, the model has {kv} KV head groups per layer; "
                         f"remove at most {kv - 1}")
    rep = heads // kv
    return {"intermediate_size": keep, "num_attention_heads": heads - cfg.head_groups * rep,
            "num_key_value_heads": kv - cfg.head_groups, "head_dim": head_dim}


def _topk_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


@torch.no_grad()
def structured(lm: LM, cfg: PruneCfg, calib: list[torch.Tensor] | None) -> tuple[nn.Module, dict]:
    """A smaller model of the same class: per layer, the FFN channels with the lowest ||X_j|| * ||W_down[:, j]|| and
    the KV groups with the lowest sum of that score over their o_proj input columns removed (X = the projection's
    input over the calibration set; magnitude: weight norms alone). The same count in every layer keeps the config
    standard, so plain `from_pretrained` loads the result."""
    from transformers import AutoModelForCausalLM

    model = lm.base
    config = model.config
    sizes = structured_sizes(config.to_dict(), cfg)
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    targets = {f"{i}.{p}": getattr(getattr(layer, p.split(".")[0]), p.split(".")[1])
               for i, layer in enumerate(layers) for p in ("mlp.down_proj", "self_attn.o_proj")}
    norms = input_norms(lm, targets, calib) if cfg.method == "wanda" else {}
    head_dim, kv = sizes["head_dim"], config.num_key_value_heads
    group_cols = config.num_attention_heads // kv * head_dim  # o_proj input columns of one KV group
    state = model.state_dict()
    for i, layer in enumerate(layers):
        p = f"{prefix}{i}."
        scores = {n: targets[f"{i}.{n}"].weight.float().norm(dim=0) *
                  (norms[f"{i}.{n}"] if norms else 1.0) for n in ("mlp.down_proj", "self_attn.o_proj")}
        ch = _topk_sorted(scores["mlp.down_proj"], sizes["intermediate_size"])
        for n in ("gate_proj", "up_proj"):
            for t in ("weight", "bias"):
                if f"{p}mlp.{n}.{t}" in state:
                    state[f"{p}mlp.{n}.{t}"] = state[f"{p}mlp.{n}.{t}"][ch]
        state[f"{p}mlp.down_proj.weight"] = state[f"{p}mlp.down_proj.weight"][:, ch]
        if cfg.head_groups:
            groups = _topk_sorted(scores["self_attn.o_proj"].view(kv, group_cols).sum(1), sizes["num_key_value_heads"])
            q_rows = (groups[:, None] * group_cols + torch.arange(group_cols)).flatten()
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            for n, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                for t in ("weight", "bias"):
                    if f"{p}self_attn.{n}.{t}" in state:
                        state[f"{p}self_attn.{n}.{t}"] = state[f"{p}self_attn.{n}.{t}"][rows]
            state[f"{p}self_attn.o_proj.weight"] = state[f"{p}self_attn.o_proj.weight"][:, q_rows]
    new_config = type(config).from_dict({**config.to_dict(), **sizes})
    with torch.device(lm.device):
        small = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
    small.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    before = sum(t.numel() for t in model.parameters())
    after = sum(t.numel() for t in small.parameters())
    return small.eval(), {**sizes, "ffn_sparsity_kept": round(1 - sizes["intermediate_size"] / config.intermediate_size, 4),
                          "params_before": before, "params_after": after}


@torch.no_grad()
def prune(lm: LM, cfg: PruneCfg, calib: list[torch.Tensor] | None) -> float:
    """Zero weights in place (magnitude / Wanda / SparseGPT); returns the measured sparsity of the pruned layers."""
    linears = block_linears(lm.base)
    if cfg.method == "sparsegpt":
        sparsegpt(lm, cfg, calib)
    else:
        norms = input_norms(lm, linears, calib) if cfg.method == "wanda" else {}
        for name, lin in tqdm(linears.items(), desc=f"{cfg.method} {cfg.pattern}", unit="layer"):
            w = lin.weight
            score = w.abs().float()
            if cfg.method == "wanda":
                score = score * norms[name].unsqueeze(0)
            w.mul_(prune_mask(score, cfg.sparsity, cfg.pattern).to(w.dtype))
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    return zeros / sum(lin.weight.numel() for lin in linears.values())


def run(src: Path, cfg: PruneCfg, out: Path, params: Params) -> dict:
    lm = load_lm(src, params.model)
    calib = data.calibration(lm.tokenizer, params.data.calibration, params.seed) if cfg.method != "magnitude" else None
    if cfg.structured:
        model, info = structured(lm, cfg, calib)
        save_weights(model, lm.tokenizer, out)
        save_hybrid(lm, out)
        return {"format": "hf", "weights": ".", "prune": {"structured": info}}
    sparsity = prune(lm, cfg, calib)
    save_weights(lm.base, lm.tokenizer, out)
    save_hybrid(lm, out)
    return {"format": "hf", "weights": ".", "prune": {"measured_sparsity": round(sparsity, 4)}}
