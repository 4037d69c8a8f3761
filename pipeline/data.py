"""Text corpora through the datasets library over local files (users point a stage at their own files the same way)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .config import CalibrationCfg, CorpusCfg, DataCfg, DomainCfg


@lru_cache(maxsize=16)
def _rows(files: str, fmt: str, field: str) -> tuple[str, ...]:
    import datasets

    datasets.disable_progress_bars()
    for f in files.split(","):
        if not Path(f.strip()).is_file():
            raise FileNotFoundError(f"params.yaml data: file {f.strip()} not found; fix the path (relative to the project root)")
    ds = datasets.load_dataset(fmt, data_files=[f.strip() for f in files.split(",")], split="train")
    if field not in ds.column_names:
        raise KeyError(f"params.yaml data: {files} has no field '{field}' (has {ds.column_names}); set field:")
    return tuple(ds[field])


def rows(corpus: CorpusCfg) -> tuple[str, ...]:
    return _rows(corpus.files, corpus.format, corpus.field)


def corpus_text(corpus: CorpusCfg) -> str:
    """A corpus as one string; rows joined by a blank line (the WikiText-2 perplexity convention)."""
    return "\n\n".join(rows(corpus))


def domain_split(domain: DomainCfg) -> tuple[str, str]:
    """(train, held-out) text of the fine-tuning domain: the held-out part is the tail of the corpus."""
    text = corpus_text(domain)
    cut = int(len(text) * (1 - domain.heldout_fraction))
    return text[:cut], text[cut:]


def eval_texts(data: DataCfg) -> dict[str, str]:
    texts = {name: corpus_text(c) for name, c in data.eval.items()}
    texts["domain_heldout"] = domain_split(data.domain)[1]
    return texts


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    # long texts in pieces: fast tokenizers are slow on one multi-MB string and warn past model max length
    ids: list[int] = []
    step = 200_000
    for i in range(0, len(text), step):
        ids.extend(tokenizer(text[i:i + step], add_special_tokens=False)["input_ids"])
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; the remainder is dropped."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"only {ids.numel()} tokens, fewer than one window of {seq_len}; lower seq_len or raise max_tokens")
    return ids[: n * seq_len].view(n, seq_len)


def calibration(tokenizer, cfg: CalibrationCfg, seed: int) -> list[torch.Tensor]:
    """`samples` random windows of `seq_len` tokens from the calibration corpus (the GPTQ / Wanda recipe)."""
    gen = torch.Generator().manual_seed(seed)
    ids = tokenize(tokenizer, corpus_text(cfg), max_tokens=max(cfg.samples * cfg.seq_len * 8, 50_000))
    if ids.numel() <= cfg.seq_len:
        raise ValueError(f"params.yaml data.calibration: corpus has {ids.numel()} tokens, need more than seq_len={cfg.seq_len}")
    starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.samples,), generator=gen)
    return [ids[s: s + cfg.seq_len].unsqueeze(0) for s in starts.tolist()]


def train_batches(ids: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of random windows from the (tokenized) training split."""
    if ids.numel() <= seq_len + 1:
        raise ValueError(f"training text has {ids.numel()} tokens, need more than seq_len={seq_len}; lower seq_len")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
