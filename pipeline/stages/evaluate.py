"""Evaluation of one artifact, loaded fresh from disk (so every node also tests its own save/load):
perplexity per corpus, parameter counts, bytes, bits per weight, peak memory, prefill / decode tokens per second.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import artifact, data, stats
from ..config import Params
from ..models import LM, dense_weight, is_quantized, load_lm


CE_CHUNK_TOKENS = 4096  # fp32 logits of 4k tokens over a 49k vocabulary: 0.8 GB, not 3.2 GB for 32 x 512


def token_nlls(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[batch, len] NLL of each target (0 where it is data.IGNORE) from [batch, len, vocab] logits, in fp32 as HF's
    loss does, a few sequences at a time: each row's value is the same as in one call, and the fp32 copy of a whole
    batch's logits (plus cross_entropy's as large log-softmax) never exists at once."""
    rows = max(1, CE_CHUNK_TOKENS // max(1, logits.shape[1]))
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], rows):
        out[i: i + rows] = torch.nn.functional.cross_entropy(
            logits[i: i + rows].float().flatten(0, 1), targets[i: i + rows].flatten(), reduction="none",
            ignore_index=data.IGNORE).view(targets[i: i + rows].shape)
    return out


@torch.no_grad()
def window_nlls(lm: LM, ids: torch.Tensor, seq_len: int, batch_size: int = 8, desc: str = "ppl") -> list[float]:
    """Mean next-token NLL of each non-overlapping window, `batch_size` windows per forward. Kept per window so the
    report can bootstrap intervals and pair nodes on the same windows."""
    wins = data.windows(ids, seq_len)
    out: list[float] = []
    with tqdm(total=len(wins), desc=desc, unit="win", leave=False) as bar:
        for i in range(0, len(wins), batch_size):
            batch = wins[i: i + batch_size].to(lm.device)
            # targets shifted by padding, not logits by slicing: slicing [B, L, vocab] would copy it
            targets = torch.nn.functional.pad(batch[:, 1:], (0, 1), value=-100)
            nll = token_nlls(lm.logits(batch), targets)
            out.extend((nll.sum(1) / (seq_len - 1)).tolist())
            bar.update(len(batch))
    return out


@torch.no_grad()
def sequence_nlls(lm: LM, seqs: data.Batch, batch_size: int = 8) -> list[float]:
    """Mean NLL over each sequence's target tokens (an instruction example's response), one value per sequence."""
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        b = seqs[i: i + batch_size].trimmed()
        # right padding: under causal attention no real position sees a pad, so no mask is needed here
        targets = torch.nn.functional.pad(b.labels[:, 1:], (0, 1), value=data.IGNORE).to(lm.device)
        nll = token_nlls(lm.logits(b.ids), targets)
        out.extend((nll.sum(1) / (targets != data.IGNORE).sum(1).clamp(min=1)).tolist())
    return out


def perplexity(lm: LM, ids: torch.Tensor, seq_len: int, batch_size: int = 8, desc: str = "ppl") -> float:
    nll = window_nlls(lm, ids, seq_len, batch_size, desc)
    return math.exp(sum(nll) / len(nll))


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
    peft = artifact.peft_dir(path)
    peft_bytes = artifact.dir_bytes(peft) - artifact.dir_bytes(peft / "seeds")  # other seeds are not deployed
    return {"bytes": weight_bytes + peft_bytes, "weight_bytes": weight_bytes, "peft_bytes": peft_bytes,
            "own_bytes": artifact.dir_bytes(path), "bits_per_weight": round(8 * weight_bytes / n_params, 3)}


@torch.no_grad()
def bitmask_bytes(lm: LM, size: dict, n_params: int) -> int | None:
    """An estimate, not a stored format: the deploy bytes if each fp decoder-block linear were stored as its nonzero
    values plus a 1-bit-per-weight mask (what a sparse kernel would read). None where it would not save bytes (a
    dense node) or does not apply (NF4 / GPTQ weights: their bits are not one value per weight)."""
    from .prune import block_linears

    eb = round(size["weight_bytes"] / n_params)  # bytes per value as stored (fp32 / bf16), not as computed here
    saved = 0
    for lin in block_linears(lm.base).values():
        if is_quantized(lin) or not lin.weight.is_floating_point() or eb < 2:
            return None
        w = lin.weight
        saved += w.numel() * eb - (int((w != 0).sum()) * eb + math.ceil(w.numel() / 8))
    return size["bytes"] - saved if saved > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: without this a timer measures the launch, not the work
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(lm: LM, ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy generation with the KV cache: prefill tokens/s over the prompt, decode tokens/s after it.
    One warm-up run, then the median of `repeats` runs, synchronized on GPU."""
    prompt = ids[None]
    prefill_s, decode_s = [], []
    for i in range(repeats + 1):
        _sync(lm.device)
        t0 = time.perf_counter()
        logits, past = lm.prefill(prompt)  # prefix and soft prompt in the cache / sequence, as in evaluation
        _sync(lm.device)
        t1 = time.perf_counter()
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            logits, past = lm.decode(nxt, past)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        _sync(lm.device)
        if i:  # the first run warms up kernels and allocator
            prefill_s.append(t1 - t0)
            decode_s.append(time.perf_counter() - t1)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"prefill_tok_s": round(prompt.shape[1] / med(prefill_s), 1), "decode_tok_s": round(new_tokens / med(decode_s), 2),
            "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens, "repeats": repeats}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (several nodes in one process, e.g. benchmarks); CPU max RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main_items(task: dict) -> list[int]:
    """Per-item correctness of a zero-shot task's headline metric: acc_norm where the task defines it (the figure
    papers and model cards report for HellaSwag, ARC, PIQA, OpenBookQA), else acc."""
    return task["items_norm"] if "items_norm" in task else task["items"]


def main_metric(task: dict) -> str:
    return "acc_norm" if "items_norm" in task else "acc"


def corpus_nlls(lm: LM, params: Params) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Per-window NLLs on every eval corpus (the domain held-out split included); also the first corpus' ids."""
    ev = params.evaluate
    nll, first_ids = {}, None
    domain = params.data.domain
    for name, text in data.eval_texts(params.data).items():
        ids = data.tokenize(lm.tokenizer, text, ev.max_tokens)
        first_ids = ids if first_ids is None else first_ids
        if name == "domain_heldout" and domain.template != "none":  # instruction data: the responses only
            seqs = data.heldout_sequences(lm.tokenizer, domain, ev.seq_len, ev.max_tokens)
            nll[name] = [round(x, 6) for x in sequence_nlls(lm, seqs, ev.batch_size)]
        else:
            nll[name] = [round(x, 6) for x in window_nlls(lm, ids, ev.seq_len, ev.batch_size, desc=f"ppl {name}")]
        if not all(math.isfinite(x) for x in nll[name]):
            raise FloatingPointError(f"perplexity on {name} is nan / inf (NaN / inf weights or activations: a corrupt "
                                     f"artifact or a diverged stage); delete the artifact and run its node again")
    return nll, first_ids


def heldout_convention(params: Params) -> str:
    domain = params.data.domain
    if domain.template != "none":
        return (f"last {domain.heldout_fraction:.0%} of the {domain.template} examples, each one sequence (prompt + "
                f"response, at most seq_len tokens): perplexity of the response tokens, averaged per example")
    return f"tail {domain.heldout_fraction:.0%} of the domain corpus ({data.convention(domain)})"


def run(path: Path, params: Params) -> dict:
    ev = params.evaluate
    t0 = time.perf_counter()
    lm = load_lm(path, params.model)
    params_ = param_stats(lm)  # before any forward: GPTQModel's CPU kernel repacks its weights on the first one
    parts = {"load": time.perf_counter() - t0}  # where the evaluation's seconds go (the speed issue's breakdown)
    nll, first_ids = corpus_nlls(lm, params)
    parts["perplexity"] = time.perf_counter() - t0 - sum(parts.values())
    ppl = {k: round(math.exp(sum(v) / len(v)), 4) for k, v in nll.items()}
    ppl_ci = {k: stats.ppl_interval(v).as_list()[1:] for k, v in nll.items()}
    tokens = {k: len(v) * ev.seq_len for k, v in nll.items()}
    latency_ = latency(lm, first_ids[: ev.latency_prompt], ev.latency_new_tokens, ev.latency_repeats)
    parts["latency"] = time.perf_counter() - t0 - sum(parts.values())
    zeroshot = {}
    if ev.zeroshot:
        from ..zeroshot import evaluate_zeroshot  # lm-eval imports take seconds: only when asked for

        zeroshot = evaluate_zeroshot(lm, dict(ev.zeroshot), batch_size=ev.zeroshot_batch_size, seed=params.seed)
        for task in zeroshot.values():
            task["ci95"] = stats.mean_interval(main_items(task)).as_list()[1:]
    parts["zeroshot"] = time.perf_counter() - t0 - sum(parts.values())
    seeds = {}
    for seed in artifact.extra_seeds(path):  # the same node trained with other seeds: same windows
        seeds[seed] = corpus_nlls(load_lm(path, params.model, seed=seed), params)[0]
    return {
        "loads_with": artifact.loads_with(artifact.read_manifest(path)),
        "ppl": ppl,
        "ppl_ci95": ppl_ci,
        "nll_per_window": nll,
        "eval": {"seq_len": ev.seq_len, "tokens": tokens, "windows": {k: len(v) for k, v in nll.items()},
                 "conventions": {k: data.convention(c) for k, c in params.data.eval.items()} |
                 {"domain_heldout": heldout_convention(params)}},
        "params": params_,
        "size": {**(size := size_stats(path, params_["total"])), "bitmask_bytes_est": bitmask_bytes(lm, size, params_["total"])},
        "latency": latency_,
        **({"zeroshot": zeroshot} if zeroshot else {}),
        **({"seeds": {str(k): {"ppl": {c: round(math.exp(sum(v) / len(v)), 4) for c, v in n.items()},
                               "nll_per_window": n} for k, n in seeds.items()}} if seeds else {}),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "eval_parts_seconds": {**{k: round(v, 2) for k, v in parts.items()},
                               "other": round(time.perf_counter() - t0 - sum(parts.values()), 2)},
    }
