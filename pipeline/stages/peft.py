"""Hybrid PEFT: LoRA on attention (peft), a bottleneck adapter after each MLP, a soft prompt and prefix tuning
(adapters.py), any subset, trained together on the domain corpus. The single-method baselines are this same code
with one method. Works over fp, sparse and NF4 bases (QLoRA); PEFT parameters stay fp32.

The artifact holds only the PEFT parts: its base weights are referenced from the parent, never copied. Except under
`prune_during`: the base is pruned while the PEFT parts train (PruneDuring), so the node holds its own sparse base.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .. import artifact, data
from ..adapters import Hybrid, decoder_layers
from ..config import Params, PeftCfg, PruneDuringCfg
from ..models import LM, load_lm, save_weights
from .evaluate import peak_memory_mb, reset_peak_memory
from .prune import block_linears, prune_mask


@torch.no_grad()
def real_token_kv(lm: LM, ids: torch.Tensor) -> torch.Tensor:
    """The base model's own keys and values of the tokens `ids` [P], [n_layers, 2, kv_heads, P, head_dim]: the prefix
    initialisation from real activations that Li & Liang found to train better than random vectors."""
    cache = lm.base(input_ids=ids[None].to(lm.device), use_cache=True).past_key_values
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float()


def add_peft(lm: LM, cfg: PeftCfg, seed: int) -> list[torch.nn.Parameter]:
    """Attach the selected PEFT parts to `lm`; returns the trainable parameters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if "lora" in cfg.methods:
        lm.model = get_peft_model(lm.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                       target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    if {"adapter", "prompt", "prefix"} & set(cfg.methods):
        config = lm.base.config
        init = None
        if "prompt" in cfg.methods:
            vocab = lm.model.get_input_embeddings().weight
            init = vocab[torch.randint(0, min(vocab.shape[0], 5000), (cfg.prompt_tokens,))].detach().float()
        prefix = {}
        if "prefix" in cfg.methods:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            prefix = {"prefix_tokens": cfg.prefix_tokens, "prefix_shape": [config.num_hidden_layers, kv_heads, head_dim],
                      "prefix_mlp": cfg.prefix_mlp_dim if cfg.prefix_mlp else None,
                      "init_prefix": None if cfg.prefix_mlp else real_token_kv(lm, torch.randint(
                          0, min(lm.model.get_input_embeddings().weight.shape[0], 5000), (cfg.prefix_tokens,)))}
        lm.hybrid = Hybrid(config.hidden_size, config.num_hidden_layers,
                           cfg.adapter_dim if "adapter" in cfg.methods else None,
                           cfg.prompt_tokens if "prompt" in cfg.methods else None, init, **prefix).to(lm.device)
        lm.hybrid.attach(lm.model)
    trainable = [p for p in lm.model.parameters() if p.requires_grad]
    return trainable + (list(lm.hybrid.parameters()) if lm.hybrid else [])


def lora_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """block_linears name -> the LoRA delta (scaling x B @ A, [out, in]) of every decoder linear LoRA targets."""
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    return {f"{i}.{n}": m.get_delta_weight(m.active_adapters[0]) for i, layer in enumerate(decoder_layers(model))
            for n, m in layer.named_modules() if isinstance(m, LoraLayer) and m.active_adapters}


class PruneDuring:
    """Pruning of the base while the PEFT parts train, called after every optimizer step (train's `on_step`).

    Cubic schedule (Zhu & Gupta 2017): s(t) = s_f (1 - (1 - (t - t0) / (t1 - t0))^3) at t0, t0 + every, ... and t1.
    Scores are Wanda's |W + BA| x ||X_j|| (or |W + BA| for magnitude) with the LoRA delta included, so the mask keeps
    what the adapted layer uses; ||X_j|| is summed over the training batches since the last pruning step (the
    current model's activations). Already-zero weights score -inf: masks only grow. Only the base weights are
    masked (they are frozen, so zeros stay zeros); the LoRA delta stays dense until a merge re-applies the mask."""

    def __init__(self, lm: LM, cfg: PruneDuringCfg, steps: int):
        self.lm, self.cfg = lm, cfg
        self.linears = block_linears(lm.model)
        self.t0 = max(1, round(cfg.start * steps))
        self.t1 = max(self.t0, round(cfg.end * steps))
        self.events = sorted(set(range(self.t0, self.t1 + 1, cfg.every)) | {self.t1})
        self.log: list[dict] = []
        self.sq = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in self.linears.items()}
        self._hooks = ([m.register_forward_hook(self._collect(n)) for n, m in self.linears.items()]
                       if cfg.method == "wanda" else [])

    def _collect(self, name: str) -> Callable:
        def hook(_m, inp, _out):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            self.sq[name] += (x * x).sum(0)
        return hook

    def target(self, step: int) -> float:
        if self.t1 == self.t0:
            return self.cfg.sparsity
        frac = min(1.0, max(0.0, (step - self.t0) / (self.t1 - self.t0)))
        return self.cfg.sparsity * (1 - (1 - frac) ** 3)

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if step not in self.events or self.target(step) <= 0:
            return
        sparsity = self.target(step)
        deltas = lora_deltas(self.lm.model)
        zeros = total = 0
        for name, lin in self.linears.items():
            w = lin.weight
            eff = w.float() + deltas[name].float() if name in deltas else w.float()
            score = eff.abs()
            if self.cfg.method == "wanda":
                score = score * self.sq[name].sqrt().unsqueeze(0)
            score.masked_fill_(w == 0, -float("inf"))
            w.mul_(prune_mask(score, sparsity, "unstructured").to(w.dtype))
            zeros += int((w == 0).sum())
            total += w.numel()
        for v in self.sq.values():
            v.zero_()
        self.log.append({"step": step, "target": round(sparsity, 4), "measured": round(zeros / total, 4)})

    def close(self) -> dict:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return {"method": self.cfg.method, "measured_sparsity": self.log[-1]["measured"] if self.log else 0.0,
                "schedule": self.log}


def train(lm: LM, params_: list[torch.nn.Parameter], cfg: PeftCfg, ids: torch.Tensor, seed: int,
          on_step: Callable[[int], None] | None = None) -> dict:
    """AdamW on the PEFT parameters; timed from the first step (tokenization is done before). `on_step(step)` runs
    after each optimizer step (1-based), e.g. PruneDuring."""
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
        if on_step is not None:
            on_step(len(losses))
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


def save_pruned_base(lm: LM, out: Path) -> None:
    """The base weights PruneDuring masked, in HF layout, without LoRA's wrappers (call after save_peft)."""
    base = lm.model.base_model.unload() if hasattr(lm.model, "peft_config") else lm.base  # unload: no merge
    save_weights(base, lm.tokenizer, out)


def run(src: Path, cfg: PeftCfg, out: Path, params: Params) -> dict:
    """Train once per seed. The first seed's parts are the node's (peft/, what children build on); the others are
    kept beside them (peft/seeds/<seed>/), so evaluation reports the spread over seeds, not one lucky run."""
    seeds = cfg.seeds or [params.seed]
    fmt = artifact.read_manifest(src)["format"]
    if cfg.prune_during and fmt != "hf":  # the plan refuses this; a hand-run node must too
        raise ValueError(f"{src}: prune_during needs an fp base, this one is {fmt}; prune before quantizing")
    runs, pruned = [], None
    for i, seed in enumerate(seeds):
        lm = load_lm(src, params.model)
        trainable = add_peft(lm, cfg, seed)
        pruner = PruneDuring(lm, cfg.prune_during, cfg.steps) if cfg.prune_during else None
        ids = data.tokenize(lm.tokenizer, data.domain_split(params.data.domain)[0])
        runs.append({"seed": seed, **train(lm, trainable, cfg, ids, seed, on_step=pruner)})
        peft = artifact.peft_dir(out)
        save_peft(lm, peft if i == 0 else artifact.seed_dir(out, seed))
        if pruner is not None:  # one seed only (config): the node's base is this run's
            pruned = pruner.close()
            save_pruned_base(lm, out)
        del lm, trainable
    weights = "." if pruned else os.path.relpath(artifact.weights_dir(src), out.resolve())
    info = {"format": fmt, "weights": weights, "train": runs[0]}
    if pruned:
        info["prune"] = pruned
    if len(runs) > 1:
        info["train_seeds"] = runs
    return info
