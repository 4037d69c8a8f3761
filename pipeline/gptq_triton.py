"""GPTQ's column walk of one block (pipeline.gptq._walk) as ONE Triton kernel: walk_block on CUDA.

Eager, a block's walk is 128 columns x a dozen tiny kernels; even replayed from a CUDA graph, ~2k kernels run one
after another (9.0 s of the Llama-3.2-1B shape's walk on an H200). Rows are independent given the block's Hinv, so
each program walks the block's columns over a tile of rows held in registers: one launch per block (2.8 s there,
bench/results/gptq_walk.json). GPTQModel does the same with an nvcc-built CUDA kernel (gptq_cuda.gptq_block_update).

Made to give exactly the eager walk's numbers: IEEE division (div_rn, as torch's `/`), rounding half to even
(torch.round), the fp16 product of the dequantization, and no multiply-add fusion (enable_fp_fusion=False: the
eager update rounds the product err x h, then the difference). Bit-identical to the eager walk on the H200
(bench/gptq_walk.py) and under TRITON_INTERPRET=1 on the CPU (test_triton_walk_equals_the_eager_walk in
tests/test_gptq_own.py, where Triton is installed).
Triton ships with CUDA builds of torch; the CPU wheel has none, and pipeline.gptq then walks eagerly.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 32


@triton.jit
def _rint(x):
    """torch.round: to the nearest integer, ties to even (exact for |x| < 2**23; in plain ops, so that the numpy
    interpreter, which lacks libdevice.rint, runs the same code)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _walk_kernel(W, Hinv, S, Z, Q, C, E, rows, width, maxq, ld, ldh,
                 RB: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    c = tl.arange(0, BW)
    rm = r < rows
    cm = c < width
    tile = tl.load(W + r[:, None] * ld + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
    for i in range(width):
        w = tl.sum(tl.where((c == i)[None, :], tile, 0.0), axis=1)  # column i (the rest are zeros: exact)
        s = tl.load(S + r * ld + i, mask=rm, other=1.0)
        z = tl.load(Z + r * ld + i, mask=rm, other=0.0)
        q = tl.minimum(tl.maximum(_rint(tl.div_rn(w, s)) + z, 0.0), maxq)
        dq = (s.to(tl.float16) * (q - z).to(tl.float16)).to(tl.float32)
        err = tl.div_rn(w - dq, tl.load(Hinv + i * ldh + i))
        h = tl.load(Hinv + i * ldh + c, mask=cm & (c >= i), other=0.0)  # columns before i are done: h = 0
        tile = tile - err[:, None] * h[None, :]
        tl.store(C + r * ld + i, q, mask=rm)
        tl.store(Q + r * ld + i, dq, mask=rm)
        tl.store(E + r * ld + i, err, mask=rm)


def walk_block(W1: torch.Tensor, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, C1, Err1) of one block's walk, as pipeline.gptq.walk_block returns them (W1 is not modified)."""
    W1, S, Z, Hinv1 = (t.contiguous() for t in (W1, S, Z, Hinv1))
    rows, width = W1.shape
    Q1, C1, Err1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    # (a launch goes to the current CUDA device: make it the tensors'; the CPU interpreter has none)
    with torch.cuda.device(W1.device) if W1.is_cuda else contextlib.nullcontext():
        _walk_kernel[grid](W1, Hinv1, S, Z, Q1, C1, Err1, rows, width, float(2 ** bits - 1), W1.stride(0),
                           Hinv1.stride(0), RB=ROWS_PER_PROGRAM, BW=triton.next_power_of_2(width),
                           enable_fp_fusion=False)
    return Q1, C1, Err1
