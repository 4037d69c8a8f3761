"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): one-shot pruning of one linear layer with the OBS update.

The algorithm of IST-DASLab/sparsegpt (`sparsegpt.py`, `SparseGPT.fasterprune`) in one small class: accumulate the
layer's input Hessian H = 2/n * X^T X over calibration tokens, then walk the columns in blocks: choose the mask of a
block from the OBS saliency w^2 / [H^-1]_cc^2, zero those weights and spread each removed weight's error over the
not-yet-visited columns through the Cholesky factor of H^-1. One deviation: the unstructured mask is chosen per
output row inside each block (the original thresholds the whole block), so every row ends with exactly
floor(sparsity * in_features) zeros, the same count as this project's magnitude and Wanda masks.
"""
from __future__ import annotations

import math

import torch

from .hessian import Hessian


class SparseGPT(Hessian):
    """Prune one nn.Linear: feed it calibration inputs with add_batch(), then call prune()."""

    @torch.no_grad()
    def prune(self, sparsity: float, nm: tuple[int, int] | None = None, blocksize: int = 128,
              percdamp: float = 0.01) -> float:
        """Prune in place to `sparsity` per row (unstructured) or N:M; returns the summed OBS loss (the layer's
        reconstruction error estimate, for the log)."""
        W = self.layer.weight.data.clone().float()
        rows = W.shape[0]
        H, dead = self.take("SparseGPT")
        W.masked_fill_(dead, 0)  # inputs never active: prune their weights first (no mask index: no GPU wait)
        Hinv = self.inverse_cholesky(H, percdamp, "SparseGPT")
        loss = torch.zeros(rows, device=W.device)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            if nm is None:
                # per row: floor(s*i2) - floor(s*i1) weights of this block, so each row totals floor(s*columns)
                k = math.floor(sparsity * i2) - math.floor(sparsity * i1)
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
                if k:
                    saliency = W1 ** 2 / d.unsqueeze(0) ** 2
                    mask1.scatter_(1, torch.topk(saliency, k, dim=1, largest=False).indices, True)
            else:
                n, m = nm
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w = W1[:, i]
                if nm is not None and i % nm[1] == 0:  # N:M: choose the group's mask from the updated weights
                    saliency = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                    mask1.scatter_(1, i + torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d[i]
                loss += (w - q) ** 2 / d[i] ** 2 / 2
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.layer.weight.data = W.to(self.layer.weight.dtype)
        return float(loss.sum())
