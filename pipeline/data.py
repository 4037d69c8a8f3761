"""Text corpora through the datasets library over local files (users point a stage at their own files the same way)."""
from __future__ import annotations

import re
from dataclasses import dataclass
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


# The Stanford Alpaca prompts (tatsu-lab/stanford_alpaca train.py PROMPT_DICT), with and without an input
ALPACA_PROMPT = {
    "prompt_input": ("Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request.\n\n"
                        "### Instruction:\n{instruction}\n\n### Response:\n"),
}


def alpaca_prompt(instruction: str, input_: str) -> str:
    if input_.strip():
        return ALPACA_PROMPT["prompt_input"].format(instruction=instruction, input=input_)
    return ALPACA_PROMPT["prompt_no_input"].format(instruction=instruction)


@lru_cache(maxsize=4)
def _examples(files: str, fields: tuple[str, str, str]) -> tuple[tuple[str, str], ...]:
    """(prompt, response) of every instruction record (Alpaca template)."""
    cols = [_rows(files, "json", f, "document") for f in fields]
    return tuple((alpaca_prompt(i or "", x or ""), o or "") for i, x, o in zip(*cols))


def examples(domain: DomainCfg) -> tuple[tuple[str, str], ...]:
    return _examples(domain.files, (domain.instruction_field, domain.input_field, domain.output_field))


def documents(domain: DomainCfg) -> list:
    """The domain's documents: (prompt, response) pairs for a templated corpus, JSON records' text, or the
    blank-line separated blocks of a text file."""
    if domain.template != "none":
        return list(examples(domain))
    if domain.format == "json":
        return [r for r in rows(domain) if r.strip()]
    return [b for text in rows(domain) for b in re.split(r"\n(?:[ \t]*\n)+", text) if b.strip()]


def split_documents(domain: DomainCfg) -> tuple[list, list]:
    """(train, held-out) documents: the held-out part is the last heldout_fraction of them (whole documents)."""
    docs = documents(domain)
    n_held = max(1, round(len(docs) * domain.heldout_fraction))
    if len(docs) < 2:
        raise DataError(f"{domain.files}: holds {len(docs)} document(s), need 2+ to hold some out; use packing: stream")
    return docs[:-n_held], docs[-n_held:]


def _doc_text(doc) -> str:
    return doc[0] + doc[1] if isinstance(doc, tuple) else doc


def domain_split(domain: DomainCfg) -> tuple[str, str]:
    """(train, held-out) text of the fine-tuning domain: the held-out part is the tail of the corpus (whole
    documents, joined by a blank line, when training is cut by documents)."""
    if domain.by_documents:
        train, held = split_documents(domain)
        return "\n\n".join(map(_doc_text, train)), "\n\n".join(map(_doc_text, held))
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


IGNORE = -100  # the label of a token that is no target: padding, an instruction prompt


@dataclass
class Batch:
    """Sequences for a causal LM: `labels` as in HF (the token itself, or IGNORE; shifted inside the loss, so a
    sequence's first label is never a target), `attention_mask` 0 on padding (right-padded)."""

    ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor) -> "Batch":
        """Unpadded sequences whose every token after the first is a target."""
        return cls(ids, ids.clone(), torch.ones_like(ids))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, idx) -> "Batch":
        return Batch(self.ids[idx], self.labels[idx], self.attention_mask[idx])

    @property
    def n_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def trimmed(self) -> "Batch":
        """Without the columns that are padding in every row (a batch of short documents computes less)."""
        width = int(self.attention_mask.any(0).nonzero().max()) + 1 if self.attention_mask.any() else 1
        return Batch(self.ids[:, :width], self.labels[:, :width], self.attention_mask[:, :width])


def _pad(pieces: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Batch:
    n = len(pieces)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (tok, lab) in enumerate(pieces):
        ids[i, : len(tok)] = torch.tensor(tok)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(tok)] = 1
    return Batch(ids, labels, mask)


def document_sequences(tokenizer, docs: list, seq_len: int, max_tokens: int | None = None) -> Batch:
    """Sequences that never span two documents. A plain document is cut into seq_len pieces, its tail padded
    (a tail of one token, which holds no target, is dropped). A (prompt, response) example is one sequence: prompt +
    response + EOS, truncated to seq_len (as Stanford Alpaca's train.py does), its prompt tokens labelled IGNORE;
    an example whose response is truncated away entirely is dropped. Padding is IGNORE with attention 0.
    `max_tokens` stops once that many real tokens are taken (an evaluation budget)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pieces: list[tuple[list[int], list[int]]] = []
    for i in range(0, len(docs), 256):  # tokenizers batch calls are fast; 256 documents a call bounds memory
        chunk = docs[i: i + 256]
        if chunk and isinstance(chunk[0], tuple):
            prompts = tokenizer([p for p, _ in chunk], add_special_tokens=False)["input_ids"]
            answers = tokenizer([r for _, r in chunk], add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            for p, a in zip(prompts, answers):
                tok = (p + a + eos)[:seq_len]
                if len(tok) > len(p):
                    pieces.append((tok, [IGNORE] * len(p) + tok[len(p):]))
        else:
            for tok_doc in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                pieces.extend((piece, piece) for piece in (tok_doc[s: s + seq_len] for s in range(0, len(tok_doc), seq_len))
                            if len(piece) >= 2)
        if max_tokens and sum(len(t) for t, _ in pieces) >= max_tokens:
            break
    if max_tokens:  # whole sequences until the budget is reached
        lengths = torch.tensor([len(t) for t, _ in pieces]).cumsum(0)
        pieces = pieces[: int((lengths < max_tokens).sum()) + 1]
    if not pieces:
        raise DataError(f"no sequence with a target from {len(docs)} document(s) at seq_len={seq_len} (an instruction "
                        f"prompt longer than seq_len leaves no response); raise stages.<name>.seq_len / evaluate.seq_len")
    return _pad(pieces, seq_len, pad_id)


def train_source(tokenizer, domain: DomainCfg, seq_len: int) -> torch.Tensor | Batch:
    """What train_batches samples from: the training split as one token stream, or its document sequences."""
    if domain.by_documents:
        return document_sequences(tokenizer, split_documents(domain)[0], seq_len)
    return tokenize(tokenizer, domain_split(domain)[0])


def heldout_sequences(tokenizer, domain: DomainCfg, seq_len: int, max_tokens: int | None = None) -> Batch:
    """The held-out split as sequences cut the way training cuts them (windows of the stream, or documents)."""
    if domain.by_documents:
        return document_sequences(tokenizer, split_documents(domain)[1], seq_len, max_tokens)
    return Batch.of(windows(tokenize(tokenizer, domain_split(domain)[1], max_tokens), seq_len))


def heldout_sample(tokenizer, domain: DomainCfg, seq_len: int, n: int) -> Batch:
    """A fixed sample of `n` held-out sequences, spread evenly over the split (the training curve's held-out loss)."""
    seqs = heldout_sequences(tokenizer, domain, seq_len, max_tokens=None if domain.by_documents else n * seq_len * 4)
    idx = torch.linspace(0, len(seqs) - 1, min(n, len(seqs))).round().long().unique()
    return seqs[idx]


def train_batches(source: torch.Tensor | Batch, seq_len: int, batch_size: int, steps: int, seed: int):
    """`steps` (micro-)batches: random windows of a token stream, or document sequences drawn without replacement
    (reshuffled each epoch), trimmed of all-padding columns."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(source, Batch):
        order: list[int] = []
        for _ in range(steps):
            while len(order) < batch_size:
                order += torch.randperm(len(source), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            yield source[torch.tensor(idx)].trimmed()
        return
    ids = source
    if ids.numel() <= seq_len + 1:
        raise ValueError(f"training text has {ids.numel()} tokens, need more than seq_len={seq_len}; lower seq_len")
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
        yield Batch.of(torch.stack([ids[s: s + seq_len] for s in starts.tolist()]))
