"""Hybrid PEFT: LoRA on attention (peft), a bottleneck adapter after each MLP, a soft prompt and prefix tuning
(adapters.py), any subset, trained together on the domain corpus. The single-method baselines are this same code
with one method. Works over fp, sparse and NF4 bases (QLoRA); PEFT parameters stay fp32.

The artifact holds only the PEFT parts: its base weights are referenced from the parent, never copied. Except under
`prune_during`: the base is pruned while the PEFT parts train (PruneDuring), so the node holds its own sparse base.
"""
from __future__ import annotations

import math
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
                           cfg.prompt_tokens if "prompt" in cfg.methods else None, init,
                           adapter_act=cfg.adapter_act, **prefix).to(lm.device)
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


def lr_factor(cfg: PeftCfg) -> Callable[[int], float]:
    """The lr multiplier after `step` optimizer steps: linear warm-up to 1, then cosine decay to 0 at `steps`
    (or constant)."""
    warmup, steps = cfg.warmup, cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return factor


def compile_layers(lm: LM) -> None:
    """torch.compile every decoder layer in place (CUDA only: on a CPU without a tuned compiler it costs more than it
    saves). One compiled graph serves all layers of the same structure; LoRA and the adapter hooks are traced in."""
    if lm.device.type != "cuda":
        return
    for layer in decoder_layers(lm.base):
        layer.compile()


class GraphedStep:
    """One optimizer step (forward, backward, gradient clipping, AdamW) recorded once as a CUDA graph, then replayed
    on each new batch copied into its static input. A 135M model's eager step is mostly kernel launches. The first
    `warmup` calls run the same step eagerly on a side stream (real training steps: lazy state such as cuBLAS
    workspaces and the optimizer's moments must exist before recording, as PyTorch's recipe says); recording
    executes nothing, so the next call records and then replays: every call is exactly one training step. The
    optimizer must be capturable with a tensor lr, so that the schedule's updates reach the replays."""

    def __init__(self, lm: LM, opt: torch.optim.Optimizer, params_: list[torch.nn.Parameter], num_items: int,
                 warmup: int = 3):
        self.lm, self.opt, self.params, self.num_items, self.warmup = lm, opt, params_, num_items, warmup
        self.calls = 0
        self.ids: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        # a host-side mask: LM.loss checks it for padding on the host, and a stream window has none
        batch = data.Batch(self.ids, self.ids, torch.ones(1, dtype=torch.long))
        loss = self.lm.loss(batch, num_items=self.num_items)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.detach()

    def release(self) -> None:
        """Free the graph and its memory pool (a worker process trains several nodes one after another)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.ids = self.loss = None

    def __call__(self, ids: torch.Tensor) -> float:
        if self.ids is None:
            self.ids = torch.empty(ids.shape, dtype=ids.dtype, device=self.lm.device)
        if ids.shape != self.ids.shape:
            raise ValueError(f"a CUDA-graph step needs fixed shapes: got {tuple(ids.shape)}, recorded {tuple(self.ids.shape)}")
        self.ids.copy_(ids)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.loss.item()
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                loss = self._step()
            torch.cuda.current_stream().wait_stream(side)
            return loss.item()
        self.opt.zero_grad(set_to_none=True)  # the recorded backward then writes the gradients, never accumulates
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self._step()
        self.graph = graph
        graph.replay()
        return self.loss.item()


def graph_blocker(lm: LM, cfg: PeftCfg, source: torch.Tensor | data.Batch, on_step: Callable | None) -> str | None:
    """Why this run cannot train through a CUDA graph (None: it can)."""
    if lm.device.type != "cuda":
        return "not on CUDA"
    if isinstance(source, data.Batch):
        return "document batches vary in width (a token-stream domain has fixed windows)"
    if cfg.grad_accum != 1:
        return "grad_accum > 1"
    if on_step is not None:
        return "prune_during changes the model between steps"
    return None


@torch.no_grad()
def heldout_loss(lm: LM, sample: data.Batch, batch_size: int, fused: bool) -> float:
    """Mean loss over every target token of the fixed held-out sample, without dropout. Only the dropout modules
    go to eval mode: gptqmodel 7.6's CPU kernel (TorchAtenLinear) switches a layer for good to a no-grad int4 path on
    its first forward in eval mode without grad, which would cut every later training gradient."""
    dropouts = [m for m in lm.model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    n = sample.n_targets
    total = sum(lm.loss(sample[i: i + batch_size].trimmed(), num_items=n, fused=fused).item()
                for i in range(0, len(sample), batch_size))
    for m in dropouts:
        m.train()
    return total


def train(lm: LM, params_: list[torch.nn.Parameter], cfg: PeftCfg, source: torch.Tensor | data.Batch, seed: int,
          heldout: data.Batch | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """AdamW on the PEFT parameters: warm-up + cosine schedule, `grad_accum` micro-batches per step, the held-out
    loss of a fixed sample every `eval_every` steps (train.curve), optional early stop on its plateau. Timed from
    the first step (tokenization is done before); the held-out evaluations are timed apart. `on_step(step)` runs
    after each optimizer step (1-based), e.g. PruneDuring."""
    blocker = graph_blocker(lm, cfg, source, on_step) if cfg.cuda_graph else "cuda_graph: false"
    graphed = blocker is None
    # a recorded step reads the lr from device memory: a tensor lr that the schedule fills in place
    opt = torch.optim.AdamW(params_, lr=torch.tensor(cfg.lr, device=lm.device) if graphed else cfg.lr,
                            weight_decay=0.0, capturable=graphed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    fused = cfg.fused_loss == "auto" and not graphed  # the fused loss selects its targets by a host-synced mask
    if cfg.compile:
        compile_layers(lm)
    every = cfg.curve_every if heldout is not None else 0
    lm.model.train()
    losses: list[float] = []
    curve: list[dict] = []
    best, bad, stopped = float("inf"), 0, None
    eval_s = 0.0
    tokens = 0
    reset_peak_memory(lm.device)

    def record(step: int) -> None:
        nonlocal eval_s, best, bad
        t = time.perf_counter()
        loss = heldout_loss(lm, heldout, cfg.batch_size, fused)
        eval_s += time.perf_counter() - t
        since = losses[len(losses) - min(every, len(losses)):] if losses else []
        curve.append({"step": step, "train_loss": round(sum(since) / len(since), 4) if since else None,
                      "heldout_loss": round(loss, 4), "lr": float(sched.get_last_lr()[0])})
        if loss < best - cfg.early_stop_min_delta:
            best, bad = loss, 0
        else:
            bad += 1

    if every:
        record(0)  # where training starts from
    micro = data.train_batches(source, cfg.seq_len, cfg.batch_size, cfg.steps * cfg.grad_accum, seed)
    graph_step = None
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {'+'.join(cfg.methods)}", unit="step")
    try:
        for step in bar:
            batches = [next(micro) for _ in range(cfg.grad_accum)]
            n = sum(b.n_targets for b in batches)  # the accumulated batch's targets: each micro-batch's share
            if graphed:
                graph_step = graph_step or GraphedStep(lm, opt, params_, n)
                total = graph_step(batches[0].ids)
                tokens += batches[0].n_tokens
            else:
                total = 0.0
                for b in batches:
                    loss = lm.loss(b, num_items=n, fused=fused)
                    loss.backward()
                    total += loss.item()
                    tokens += b.n_tokens
                torch.nn.utils.clip_grad_norm_(params_, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if not math.isfinite(total):
                raise FloatingPointError(f"training loss is {total} at step {step + 1} (diverged, or a corrupt base); "
                                         f"lower stages.<name>.lr or rebuild the parent node")
            sched.step()
            losses.append(total)
            if on_step is not None:
                on_step(len(losses))
            bar.set_postfix(loss=f"{total:.3f}")
            if every and ((step + 1) % every == 0 or step + 1 == cfg.steps):
                record(step + 1)
                if cfg.early_stop_patience and bad >= cfg.early_stop_patience:
                    stopped = step + 1
                    break
    finally:  # the recorded step's private memory pool goes now, not whenever the object is collected
        if graph_step is not None:
            graph_step.release()
    seconds = time.perf_counter() - t0 - eval_s
    lm.model.eval()
    k = max(1, len(losses) // 5)
    return {"steps": len(losses), "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
            "trainable_params": sum(p.numel() for p in params_), "peak_memory_mb": peak_memory_mb(lm.device),
            "loss_impl": lm.loss_impl(fused),
            "cuda_graph": "on" if graphed else f"off: {blocker}", "grad_accum": cfg.grad_accum, "warmup_steps": cfg.warmup,
            "schedule": cfg.schedule, "curve": curve, "heldout_eval_seconds": round(eval_s, 2),
            **({"stopped_early_at": stopped} if stopped else {})}


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
        domain = params.data.domain
        source = data.train_source(lm.tokenizer, domain, cfg.seq_len)
        heldout = data.heldout_sample(lm.tokenizer, domain, cfg.seq_len, cfg.eval_sequences) if cfg.curve_every else None
        runs.append({"seed": seed, **train(lm, trainable, cfg, source, seed, heldout, on_step=pruner)})
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
