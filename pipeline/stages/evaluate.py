"""Evaluation of one artifact, loaded fresh from disk (so every node also tests its own save/load):
perplexity per corpus, parameter counts, bytes, bits per weight, peak memory, prefill / decode tokens per second.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import artifact, data
from ..config import Params
from ..models import LM, dense_weight, load_lm


@torch.no_grad()
def perplexity(lm: LM, ids: torch.Tensor, seq_len: int, desc: str = "ppl") -> float:
    wins = data.windows(ids, seq_len)
    nll = sum(lm.loss(w[None]).item() for w in tqdm(wins, desc=desc, unit="win", leave=False))
    return math.exp(nll / len(wins))


@torch.no_grad()
def param_stats(lm: LM) -> dict:
    """Logical parameter counts: a 4-bit linear counts in*out weights, not its packed storage."""
    total = nonzero = peft = 0
    seen: set[int] = set()
    for name, mod in lm.model.named_modules():
        dense = dense_weight(mod)
        if dense is not None:
            total += dense.numel()
            nonzero += int((dense != 0).sum())
            bias = getattr(mod, "bias", None)
            if bias is not None:
                total += bias.numel()
                nonzero += int((bias != 0).sum())
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if "lora_" in f"{name}.{pname}":
                peft += p.numel()
            else:
                total += p.numel()
                nonzero += int((p != 0).sum())
    if lm.hybrid is not None:
        peft += sum(p.numel() for p in lm.hybrid.parameters())
    return {"total": total, "nonzero": nonzero, "peft": peft, "sparsity": round(1 - nonzero / total, 4)}


def size_stats(path: Path, n_params: int) -> dict:
    """Bytes a deployment needs (base weights, referenced or own, + PEFT files) and what this artifact stores."""
    wdir = artifact.weights_dir(path)
    weight_bytes = sum(f.stat().st_size for f in wdir.glob("*.safetensors"))
    peft_bytes = artifact.dir_bytes(artifact.peft_dir(path))
    return {"bytes": weight_bytes + peft_bytes, "weight_bytes": weight_bytes, "peft_bytes": peft_bytes,
            "own_bytes": artifact.dir_bytes(path), "bits_per_weight": round(8 * weight_bytes / n_params, 3)}


@torch.no_grad()
def latency(lm: LM, ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy generation with the KV cache: prefill tokens/s over the prompt, decode tokens/s after it."""
    prompt = ids[None]

    def prefill():
        return lm.model(inputs_embeds=lm.embeds(prompt), use_cache=True)

    prefill()  # warm-up
    t_prefill = float("inf")
    for _ in range(3):  # best of 3: one run on a busy CPU is noise
        t0 = time.perf_counter()
        out = prefill()
        t_prefill = min(t_prefill, time.perf_counter() - t0)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = lm.model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t_decode = time.perf_counter() - t0
    return {"prefill_tok_s": round(prompt.shape[1] / t_prefill, 1), "decode_tok_s": round(new_tokens / t_decode, 2),
            "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (several nodes in one process, e.g. benchmarks); CPU max RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(path: Path, params: Params) -> dict:
    ev = params.evaluate
    t0 = time.perf_counter()
    lm = load_lm(path, params.model)
    params_ = param_stats(lm)  # before any forward: GPTQModel's CPU kernel repacks its weights on the first one
    ppl, tokens = {}, {}
    first_ids = None
    for name, text in data.eval_texts(params.data).items():
        ids = data.tokenize(lm.tokenizer, text, ev.max_tokens)
        first_ids = ids if first_ids is None else first_ids
        tokens[name] = (ids.numel() // ev.seq_len) * ev.seq_len
        ppl[name] = round(perplexity(lm, ids, ev.seq_len, desc=f"ppl {name}"), 4)
        if not math.isfinite(ppl[name]):
            raise FloatingPointError(f"{path}: perplexity on {name} is {ppl[name]} (NaN / inf weights or activations: "
                                     f"a corrupt artifact or a diverged stage); delete it and run its node again")
    return {
        "ppl": ppl,
        "eval": {"seq_len": ev.seq_len, "tokens": tokens},
        "params": params_,
        "size": size_stats(path, params_["total"]),
        "latency": latency(lm, first_ids[: ev.latency_prompt], ev.latency_new_tokens),
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }
