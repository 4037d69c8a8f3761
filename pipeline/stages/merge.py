"""Merge: fold LoRA into the base weights in fp32. An NF4 base is dequantized first (folding a small LoRA delta
straight into NF4 re-rounds most of it away); a sparse base can keep its zeros. Linear bottleneck adapters
(adapter_act: linear) fold exactly into each MLP's down_proj; GELU adapters and the soft prompt are kept as modules.
The merge error (max |logit| difference and perplexity, unmerged vs merged; the adapter fold's own share) is recorded.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import artifact, data
from ..adapters import decoder_layers
from ..config import MergeCfg, Params
from ..models import LM, dtype_of, load_lm, save_hybrid, save_weights
from .prune import block_linears


@torch.no_grad()
def check_logits(lm: LM, windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    logits, nll = [], 0.0
    for ids in windows:
        out = lm.logits(ids[None]).float()
        logits.append(out)
        nll += torch.nn.functional.cross_entropy(out[0, :-1], ids[1:].to(lm.device)).item()
    return logits, math.exp(nll / len(windows))


@torch.no_grad()
def fold_linear_adapters(lm: LM) -> None:
    """The adapter after each MLP maps its output h = W x (+ b) to h + U D h = (I + U D) h, so it is the same as
    down_proj with W' = (I + U D) W and b' = (I + U D) b: fold it there in fp32 and drop the adapter modules."""
    for i, (layer, adapter) in enumerate(zip(decoder_layers(lm.base), lm.hybrid.adapters)):
        down = getattr(layer.mlp, "down_proj", None)
        if not isinstance(down, torch.nn.Linear):
            raise ValueError(f"layer {i}: {type(layer.mlp).__name__} has no down_proj linear to fold a linear adapter into; "
                             f"set adapter_act: gelu in that peft stage")
        m = adapter.up.weight.float() @ adapter.down.weight.float()  # U D: [hidden, hidden]
        down.weight.copy_(down.weight.float() + m @ down.weight.float())
        if down.bias is not None:
            down.bias.copy_(down.bias.float() + m @ down.bias.float())
    lm.hybrid.drop_adapters(lm.model)
    if not lm.hybrid.methods:  # nothing left beside the weights: a plain checkpoint
        lm.hybrid = None


@torch.no_grad()
def fold(lm: LM, masks: dict[str, torch.Tensor], dtype: torch.dtype, windows: torch.Tensor | None = None) -> float | None:
    """Fold LoRA and linear adapters into the (fp32) base weights, re-apply kept sparsity masks, then cast to the
    run's dtype. Folding in bf16 would round W + BA to bf16 twice and lose most of a small delta.
    Returns the adapter fold's own max |logit| difference on `windows` (None when no adapter was folded)."""
    if hasattr(lm.model, "merge_and_unload"):
        lm.model = lm.model.merge_and_unload()
    adapter_err = None
    if lm.hybrid is not None and lm.hybrid.foldable:
        before = check_logits(lm, windows)[0] if windows is not None else None
        fold_linear_adapters(lm)
        if before is not None:
            adapter_err = max((a - b).abs().max().item() for a, b in zip(before, check_logits(lm, windows)[0]))
    for n, lin in block_linears(lm.model).items():
        if n in masks:  # after the adapter fold too: a masked down_proj keeps its zeros, at the cost of exactness
            lin.weight.mul_(masks[n].to(lin.weight.dtype))
    lm.model.to(dtype)
    if lm.hybrid is not None:
        lm.hybrid.to(torch.float32)  # PEFT modules stay fp32 (they cast their input)
    return adapter_err


def run(src: Path, cfg: MergeCfg, out: Path, params: Params) -> dict:
    man = artifact.read_manifest(src)
    state = man["state"]
    ev = params.evaluate
    text = next(iter(data.eval_texts(params.data).values()))
    unmerged = load_lm(src, params.model)
    if state.get("lora") and not hasattr(unmerged.model, "peft_config"):
        raise RuntimeError(f"{src}: its state has LoRA but no LoRA was loaded from {artifact.peft_dir(src) / 'lora'}; "
                           f"rebuild that node")
    ids = data.tokenize(unmerged.tokenizer, text, ev.seq_len * ev.merge_check_windows)
    wins = data.windows(ids, ev.seq_len)
    ref_logits, ppl_unmerged = check_logits(unmerged, wins)
    run_dtype = dtype_of(params.model, unmerged.device)
    del unmerged

    lm = load_lm(src, params.model, dequantize_base=True, dtype=torch.float32)
    masks = {}
    if state.get("sparse") and cfg.keep_mask:
        masks = {n: lin.weight != 0 for n, lin in block_linears(lm.base).items()}
    folded = ["lora"] * bool(state.get("lora")) + ["adapter"] * bool(lm.hybrid is not None and lm.hybrid.foldable)
    adapter_err = fold(lm, masks, run_dtype, wins)
    logits, ppl_merged = check_logits(lm, wins)
    if not all(torch.isfinite(x).all() for x in logits):
        raise FloatingPointError(f"{src}: merged logits are not finite (corrupt weights); rebuild the parent node")
    max_diff = max((a - b).abs().max().item() for a, b in zip(ref_logits, logits))
    save_weights(lm.model, lm.tokenizer, out)
    save_hybrid(lm, out)
    return {"format": "hf", "weights": ".",
            "merge_error": {"max_abs_logit_diff": float(f"{max_diff:.3g}"), "ppl_unmerged": round(ppl_unmerged, 4),
                            "ppl_merged": round(ppl_merged, 4), "windows": len(wins), "seq_len": ev.seq_len,
                            "dequantized_from": state.get("quant"), "kept_mask": bool(masks),
                            "folded_in": "float32", "saved_as": str(run_dtype).removeprefix("torch."), "folded": folded,
                            **({"adapter_fold_max_abs_logit_diff": float(f"{adapter_err:.3g}")}
                               if adapter_err is not None else {})}}
