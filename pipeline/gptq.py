"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): one-shot weight quantization of one linear layer.

The algorithm of IST-DASLab/gptq (`gptq.py`, `GPTQ.fasterquant`, with its `quant.py` Quantizer) in one small class:
accumulate the layer's input Hessian H = 2/n * X^T X over calibration tokens, then walk the columns in blocks:
round each column to its grid and spread the rounding error over the not-yet-visited columns through the Cholesky
factor of the damped H^-1. A group's scale and zero point are fixed when the walk reaches its first column (the
reference's non-static groups, computed from the weights as they stand then). The walk order is GPTQModel's (7.6):
`desc_act` walks the columns by decreasing diag(H), the groups then being runs of the walk (g_idx records each
column's); otherwise, with groups, group-aware reordering (GAR, Gafni et al. 2025, arXiv 2505.14638) walks whole
groups of consecutive columns, the group of the largest diag(H) first, each group's columns by decreasing diag(H):
the salient columns are quantized early, while the most columns remain to absorb their error, yet every group is
still consecutive columns (g_idx stays i // group_size; no act-order gather at inference). One deviation: the GPTQ checkpoint stores float16 scales
and its kernels dequantize as the float16 product scale * (code - zero), so each scale is rounded to float16 when
it is chosen and each weight dequantized that way: the walk then spreads the error of exactly the weights the
checkpoint holds (a change of at most ~1e-3 of a grid step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hessian import Hessian

try:
    from . import gptq_triton  # Triton comes with CUDA builds of torch; the CPU wheel has none
except ImportError:
    gptq_triton = None


@dataclass
class Quantized:
    """One quantized linear: weight = scales[:, g_idx] * (codes - zeros[:, g_idx]) (float32, what the model computes
    with); codes [out, in], scales / zeros [out, groups] (zeros integral), g_idx [in] (int32)."""

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


def grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [rows, cols], the reference Quantizer.find_params (min / max range including 0;
    symmetric: zero fixed at the middle, (maxq + 1) / 2), scale rounded to float16."""
    maxq = 2 ** bits - 1
    zero = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero)
    xmax = torch.maximum(x.max(1).values, zero)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid holds it; the reference uses [-1, 1]
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)  # (a mask assignment syncs the GPU)
    scale = ((xmax - xmin) / maxq).half().clamp(min=torch.finfo(torch.float16).tiny).float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of a column w [rows] on the per-row grid; dequantized as the checkpoint's kernels do."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return q, (scale.half() * (q - zero).half()).float()


def walk_order(diag: torch.Tensor, gs: int, desc_act: bool, group_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, group): the columns in walk order and each walk position's group (GPTQModel's orders, see above)."""
    columns = diag.numel()
    if desc_act:
        perm = torch.argsort(diag, descending=True)
        return perm, torch.arange(columns, device=diag.device) // gs
    if group_aware:
        values, local = torch.sort(diag.view(-1, gs), dim=1, descending=True)
        order = torch.argsort(values[:, 0], descending=True, stable=True)  # groups by their largest diag(H)
        perm = (local + torch.arange(0, columns, gs, device=diag.device).unsqueeze(1))[order].reshape(-1)
    else:
        perm = torch.arange(columns, device=diag.device)
    return perm, perm // gs


class GPTQ(Hessian):
    """Quantize one nn.Linear: feed it calibration inputs with add_batch(), then call quantize()."""

    def quantize(self, bits: int, group_size: int = -1, sym: bool = True, desc_act: bool = False,
                 blocksize: int = 128, percdamp: float = 0.01, group_aware: bool = True) -> Quantized:
        """Quantize the layer's weight in place (it then holds the dequantized weights) and return the codes, grids
        and g_idx for packing. group_aware: GAR when not desc_act (GPTQModel's default)."""
        return quantize_together([self], bits, group_size, sym, desc_act, blocksize, percdamp, group_aware)[0]


@torch.no_grad()
def quantize_together(solvers: list[GPTQ], bits: int, group_size: int = -1, sym: bool = True,
                      desc_act: bool = False, blocksize: int = 128, percdamp: float = 0.01,
                      group_aware: bool = True) -> list[Quantized]:
    """GPTQ.quantize of linears that read one same input (q / k / v, gate / up: equal Hessians) as one matrix of
    their stacked rows. GPTQ treats rows independently given H, so this is the same result as one linear at a time,
    with one column walk instead of several (a third fewer columns on a llama layer)."""
    layers = [s.layer for s in solvers]
    W = torch.cat([lin.weight.data.float() for lin in layers])
    rows, columns = W.shape
    H, dead = solvers[0].take("GPTQ")
    for s in solvers[1:]:
        s.take("GPTQ")  # equal by construction (the same inputs); released
    W.masked_fill_(dead, 0)  # (a mask index, W[:, dead] = 0, would wait for the GPU)
    gs = group_size if group_size > 0 else columns
    if columns % gs:
        raise ValueError(f"group_size: {group_size} does not divide in_features {columns}; use one that does")
    perm, group = walk_order(torch.diag(H), gs, desc_act, group_aware and group_size > 0)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = solvers[0].inverse_cholesky(H, percdamp, "GPTQ")
    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, columns // gs, device=W.device)
    zeros = torch.zeros_like(scales)
    groups = group.tolist()
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        # Each group's grid comes from W as it stands when the walk reaches the group's first column, before this
        # block's own updates (the reference's quirk). W changes only between blocks, so every grid of the block is
        # known before its walk: per-column scale / zero, then the walk itself has no branches (one kernel on CUDA).
        S, Z = [], []
        for p in range(i1, i2):
            if p % gs == 0:
                scale, zero = grid(W[:, p:p + gs], bits, sym)
                scales[:, groups[p]], zeros[:, groups[p]] = scale, zero
            S.append(scale)
            Z.append(zero)
        Q1, C1, Err1 = walk_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], torch.stack(S, 1), torch.stack(Z, 1), bits)
        Q[:, i1:i2], codes[:, i1:i2] = Q1, C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q, codes, g_idx = Q[:, inv], codes[:, inv].to(torch.int32), group[inv].to(torch.int32)
    out, r0 = [], 0
    for lin in layers:
        r1 = r0 + lin.out_features
        part = Quantized(*(t.clone() for t in (Q[r0:r1], codes[r0:r1], scales[r0:r1], zeros[r0:r1], g_idx)))
        lin.weight.data = part.weight.to(lin.weight.dtype)  # (own storage: a checkpoint refuses shared tensors)
        out.append(part)
        r0 = r1
    return out


def _walk(W1: torch.Tensor, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, bits: int,
          Q1: torch.Tensor, C1: torch.Tensor, Err1: torch.Tensor) -> None:
    """The column walk of one block, in place on W1: round each column to its grid (S / Z: the scale and zero of
    each column's group), spread its error over the block's later columns, record codes, weights and errors."""
    for i in range(W1.shape[1]):
        w = W1[:, i]
        C1[:, i], Q1[:, i] = quantize(w, S[:, i], Z[:, i], bits)
        err = (w - Q1[:, i]) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err


def walk_block(W1: torch.Tensor, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, C1, Err1) of one block's walk (W1 is not modified): on CUDA one Triton kernel, elsewhere eager. Eager on
    a GPU, a 135M model's pass is ~150k columns x a dozen tiny kernels each, bound by their launches."""
    if W1.is_cuda and gptq_triton is not None:
        return gptq_triton.walk_block(W1, Hinv1, S, Z, bits)
    W1 = W1.clone()
    Q1, C1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    _walk(W1, Hinv1, S, Z, bits, Q1, C1, Err1)
    return Q1, C1, Err1
