"""Layer-wise Hessians of linear inputs, gathered sequentially (the walk SparseGPT and GPTQ share).

`Hessian` accumulates H = 2/n * X^T X over the calibration tokens a linear sees and gives the upper Cholesky factor
of the damped H^-1 both solvers walk. `sequential` feeds it as the papers do: decoder layer by decoder layer, each
layer's inputs having gone through the already-compressed earlier layers, with whatever the LM carries active
(soft prompt, prefix, bottleneck adapters as hooks, LoRA inside its wrapper), so the Hessians are those of the
inputs the layers see in deployment.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .adapters import decoder_layers
from .models import LM, cache_kwarg


class Hessian:
    """The input Hessian of one nn.Linear: feed it calibration inputs with add_batch()."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.columns = layer.in_features
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Running mean of 2 x x^T over every token seen (what the reference code does, batch by batch)."""
        x = inp.detach().reshape(-1, inp.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.T @ x

    def share(self, other: "Hessian") -> None:
        """Hold a copy of `other`'s Hessian: a linear reading the same input tensor has the same one (the solvers
        change H in place, so each gets its own copy)."""
        self.H, self.nsamples = other.H.clone(), other.nsamples

    def take(self, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, dead): the Hessian, released from the solver (one [in, in] matrix per layer adds up on a large
        model), with never-active inputs set to 1 on the diagonal; their weights cannot matter."""
        if self.nsamples == 0:
            raise RuntimeError(f"{what}: no calibration inputs reached this layer")
        H, self.H = self.H, None
        dead = torch.diag(H) == 0
        H.diagonal().masked_fill_(dead, 1)  # (not H[dead, dead] = 1: a mask index waits for the GPU)
        return H, dead

    def inverse_cholesky(self, H: torch.Tensor, percdamp: float, what: str) -> torch.Tensor:
        """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (dampened in place)."""
        H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        except torch.linalg.LinAlgError:
            raise ValueError(f"{what}: the Hessian of a {self.layer.out_features}x{self.columns} layer is not positive "
                             f"definite; raise damp (now {percdamp}) or the calibration samples") from None


class _Captured(Exception):
    """Raised by the pre-hook on the first decoder layer once it holds that layer's inputs."""


BATCH_TOKENS = 16384  # calibration samples of one length go through the layers stacked, up to this many tokens


def batched(calib: list[torch.Tensor], tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """Consecutive samples of one length stacked into batches of at most `tokens` tokens: 128 x 2048 calibration
    tokens as 128 one-sample forwards per layer and pass kept a GPU launch-bound (each sample is causal on its own,
    and the Hessians sum over tokens, so stacking changes nothing but float summation order)."""
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for ids in calib:
        if run and (ids.shape[1:] != run[0].shape[1:] or sum(r.numel() for r in run) + ids.numel() > tokens):
            out.append(torch.cat(run))
            run = []
        run.append(ids)
    return out + ([torch.cat(run)] if run else [])


@torch.no_grad()
def layer_inputs(lm: LM, calib: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword args) entering the first decoder layer, per batch of calibration samples (`batched`):
    the model runs only up to that layer (embeddings, soft prompt, rotary embeddings and mask built by the model's
    own code)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_m, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = decoder_layers(lm.base)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batched(calib):
            try:
                lm.logits(ids)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def hidden_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 5 layers return a tensor, older ones a tuple


def run_layer(lm: LM, layer: nn.Module, hidden: torch.Tensor, kw: dict) -> torch.Tensor:
    """One decoder layer on captured inputs. A prefix cache is grown in place by every call, so each call gets a
    fresh one holding only the prefix, as in deployment (cropping has no API common to the transformers we admit)."""
    if lm.n_prefix:
        kw = {k: (lm.hybrid.prefix.cache(hidden.shape[0], lm.base.config, hidden.dtype)
                  if k in (cache_kwarg(type(lm.base)), "past_key_values") and v is not None else v)
              for k, v in kw.items()}
    return hidden_of(layer(hidden, **kw))


def linears_of(layer: nn.Module) -> dict[str, nn.Linear]:
    """The base linears of one decoder layer (under a LoRA wrapper: its base_layer; LoRA's own A / B skipped)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}


@torch.no_grad()
def input_groups(lm: LM, layer: nn.Module, hidden: torch.Tensor, kw: dict) -> list[list[str]]:
    """The layer's base linears in the order its forward calls them, those reading one same input tensor together
    (llama-like: [q, k, v], [o], [gate, up], [down]; GPTQModel's true-sequential subsets, found from one forward
    instead of a per-architecture table). Linears the forward never calls come last, each a group of its own."""
    linears = linears_of(layer)
    calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their memory from being reused meanwhile
    handles = [m.register_forward_pre_hook(lambda _m, inp, n=n: calls.append((n, inp[0]))) for n, m in linears.items()]
    try:
        run_layer(lm, layer, hidden, kw)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    prev = None
    for name, x in calls:
        if any(name in g for g in groups):
            continue
        same = prev is not None and (x.data_ptr(), x.shape, x.stride()) == (prev.data_ptr(), prev.shape, prev.stride())
        if same:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = x
    missed = [n for n in linears if not any(n in g for g in groups)]
    return groups + [[n] for n in missed]


@torch.no_grad()
def sequential(lm: LM, calib: list[torch.Tensor], make: Callable[[nn.Linear], Hessian],
               solve: Callable[[dict[str, Hessian]], None], desc: str, true_sequential: bool = False) -> None:
    """Per decoder layer: a pass over the calibration inputs fills a Hessian per base linear (`make`), `solve`
    compresses them in place, one input group at a time (name -> Hessian, name = `<layer index>.<path in the layer>`;
    the linears of a group read one same input, so their Hessians are equal), then the inputs go through the
    compressed layer to become the next layer's. By default all linears of a layer come from one pass (the reference
    code's default); true_sequential: one pass per input group (input_groups), so o_proj's Hessian is of the outputs
    of the already-compressed q / k / v, down_proj's of the compressed gate / up (GPTQModel's default)."""
    inputs = layer_inputs(lm, calib)
    for i, layer in enumerate(tqdm(decoder_layers(lm.base), desc=desc, unit="layer")):
        linears = linears_of(layer)
        groups = input_groups(lm, layer, *inputs[0])
        for passed in groups if true_sequential else [[n for g in groups for n in g]]:
            solvers = {f"{i}.{n}": make(linears[n]) for n in passed}
            # one accumulation per input tensor: the linears of a group (q / k / v, gate / up) read the same one
            # (GPTQModel's dedup_shared_inputs), the others get a copy of it before their solve
            readers = [solvers[f"{i}.{g[0]}"] for g in groups if g[0] in passed]
            handles = [s.layer.register_forward_hook(lambda _m, inp, _out, s=s: s.add_batch(inp[0])) for s in readers]
            try:
                for hidden, kw in inputs:
                    run_layer(lm, layer, hidden, kw)
            finally:
                for h in handles:
                    h.remove()
            for group in groups:
                if group[0] in passed:
                    for n in group[1:]:
                        solvers[f"{i}.{n}"].share(solvers[f"{i}.{group[0]}"])
                    solve({f"{i}.{n}": solvers[f"{i}.{n}"] for n in group})
        inputs = [(run_layer(lm, layer, hidden, kw), kw) for hidden, kw in inputs]  # through the compressed layer
