"""Text corpora through the datasets library over local files (users point a stage at their own files the same way)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .config import CalibrationCfg, CorpusCfg, DataCfg, DomainCfg


class DataError(ValueError):
    """A data file that cannot be read as configured: one line naming the file and the fix."""


def _files(files: str) -> list[str]:
    return [f.strip() for f in files.split(",") if f.strip()]


@lru_cache(maxsize=16)
def _rows(files: str, fmt: str, field: str, read_as: str) -> tuple[str, ...]:
    import datasets

    datasets.disable_progress_bars()
    paths = _files(files)
    for f in paths:
        if not Path(f).is_file():
            raise DataError(f"data file {f} not found; fix the path in params.yaml (relative to its directory)")
    # text: a file is one document (the datasets text loader would split it into lines and drop the breaks)
    kw = {"sample_by": "line", "keep_linebreaks": True} if read_as == "hf_rows" else {"sample_by": "document"}
    try:
        ds = datasets.load_dataset(fmt, data_files=paths, split="train", **(kw if fmt == "text" else {}))
    except Exception as exc:  # the datasets library raises many types for a bad file; name the file
        raise DataError(f"{files}: cannot be read as {fmt} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                        f"fix the file or its format: in params.yaml") from None
    if field not in ds.column_names:
        raise DataError(f"{files}: has no field '{field}' (has {ds.column_names}); set field: in params.yaml")
    rows = tuple(ds[field])
    if read_as == "hf_rows" and fmt == "text":
        rows = tuple(r if r.strip() else "" for r in rows)  # the HF split stores whitespace-only lines as ''
    if not any(r.strip() for r in rows if isinstance(r, str)):
        raise DataError(f"{files}: holds no text; point params.yaml at a file with text")
    return rows


def rows(corpus: CorpusCfg) -> tuple[str, ...]:
    return _rows(corpus.files, corpus.format, corpus.field, corpus.read_as)


def corpus_text(corpus: CorpusCfg) -> str:
    """A corpus as one string: documents (files, JSON records, or HF-split rows) joined by a blank line."""
    return "\n\n".join(rows(corpus))


def convention(corpus: CorpusCfg) -> str:
    """How a corpus becomes one token stream, in words (for the report)."""
    if corpus.format == "json":
        return f"JSON records' `{corpus.field}` joined by a blank line"
    if corpus.read_as == "hf_rows":
        return "HF split rows (lines with their newline, blank lines empty) joined by a blank line: the GPTQ/Wanda convention"
    return "the file as it is" if len(_files(corpus.files)) == 1 else "the files as they are, joined by a blank line"


def domain_split(domain: DomainCfg) -> tuple[str, str]:
    """(train, held-out) text of the fine-tuning domain: the held-out part is the tail of the corpus."""
    text = corpus_text(domain)
    cut = int(len(text) * (1 - domain.heldout_fraction))
    cut = text.find("\n", cut) + 1 or cut  # at a line start: neither split begins or ends mid-line
    return text[:cut], text[cut:]


def eval_texts(data: DataCfg) -> dict[str, str]:
    texts = {name: corpus_text(c) for name, c in data.eval.items()}
    texts["domain_heldout"] = domain_split(data.domain)[1]
    return texts


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    # long texts in pieces: fast tokenizers are slow on one multi-MB string and warn past model max length
    # pieces end at a line break, so no word is cut in two
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = len(text) if len(text) - start <= 200_000 else text.rfind("\n", start, start + 200_000) + 1 or start + 200_000
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
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
