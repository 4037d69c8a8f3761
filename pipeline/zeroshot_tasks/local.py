"""Loaders for the zero-shot tasks: each reads the local copy under data/<dir>/ (never a hub) and returns the split
lm-eval's built-in task evaluates, with the rows, fields and order of the Hugging Face split that task names
(each dir's SOURCE.md gives that mapping and how the files were checked against it).

lm-eval calls these through `custom_dataset: !function local.<name>` in the task YAMLs beside this file, with the
task's metadata as keyword arguments (pipeline.zeroshot passes them through TaskManager(metadata=...)):
- `data_root`: where the data dirs are (default: the repository's data/);
- `zeroshot`: {"seed": int, "limits": {task: int | None}}: the split is cut to the seeded sample of `limit` items
  (`sample_ids`) here, before lm-eval sees it. lm-eval's own way, evaluate(samples=...), decodes every row of the
  full split three times per call: ~5 s over the nine tasks, as long as the forwards of the tiny test model, for
  the same docs. Each doc carries `doc_index`, its index in the full split.

The helpers under "verbatim from lm-eval" are copies of lm-eval 0.4.13's own task code (hellaswag/utils.py,
winogrande/preprocess_winogrande.py), kept here because the YAMLs may only reference functions beside them.
"""
from __future__ import annotations

import bz2
import csv
import functools
import json
import random
import re
from pathlib import Path

import datasets

DATA_ROOT = Path(__file__).resolve().parents[2] / "data"
# Items in each task's full split (the HF split's num_examples): a loader refuses files with another count
SIZES: dict[str, int] = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838,
                         "winogrande": 1267, "boolq": 3270, "lambada_openai": 5153, "openbookqa": 500, "sst2": 872}


def sample_ids(task: str, size: int, limit: int | None, seed: int) -> list[int] | None:
    """The indices (sorted) of the `limit` items evaluated out of a split of `size`, None for all of them: a sample
    seeded by (seed, task), so every node gets the same items whichever other tasks run. Not lm-eval's first-N:
    HellaSwag's and WinoGrande's items come in runs from one source."""
    if limit is None or limit >= size:
        return None
    if limit < 1:
        raise ValueError(f"zero-shot limit for {task} must be >= 1 or None (all {size} items), got {limit}")
    return sorted(random.Random(f"{seed}:{task}").sample(range(size), limit))


def _root(data_root: str | Path | None) -> Path:
    return Path(data_root) if data_root else DATA_ROOT


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(task: str, split: str, rows: list[dict], zeroshot: dict | None, to_doc=None) -> datasets.DatasetDict:
    """The `split` of `task` as lm-eval reads it, cut to the sample `zeroshot` asks for; `to_doc` maps each chosen
    row to its doc (work done only for the items evaluated)."""
    if len(rows) != SIZES[task]:
        raise ValueError(f"{task}: the local data has {len(rows)} items, the split {SIZES[task]}; see its SOURCE.md")
    zs = zeroshot or {}
    ids = sample_ids(task, len(rows), (zs.get("limits") or {}).get(task), int(zs.get("seed", 0)))
    ids = range(len(rows)) if ids is None else ids
    docs = [dict(to_doc(rows[i]) if to_doc else rows[i], doc_index=i) for i in ids]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


# ---------------------------------------------------------------- ARC (allenai/ai2_arc, split test)
def _arc(path: Path) -> list[dict]:
    out = []
    for d in _jsonl(path):
        q = d["question"]
        out.append({"id": d["id"], "question": q["stem"],
                    "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
                    "answerKey": d["answerKey"]})
    return out


def arc_easy(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    return _split("arc_easy", "test", _arc(_root(data_root) / "ai2-arc-test" / "ARC-Easy-Test.jsonl"), zeroshot)


def arc_challenge(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    rows = _arc(_root(data_root) / "ai2-arc-test" / "ARC-Challenge-Test.jsonl")
    return _split("arc_challenge", "test", rows, zeroshot)


# ---------------------------------------------------------------- BoolQ (aps/super_glue boolq, split validation)
def boolq(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    rows = _jsonl(_root(data_root) / "boolq-superglue-val" / "val.jsonl")
    # the file says "true"/"false"; the HF ClassLabel is 0 = False, 1 = True (the index into ["no", "yes"])
    return _split("boolq", "validation", [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                                           "label": 1 if r["label"] == "true" else 0} for r in rows], zeroshot)


# ---------------------------------------------------------------- LAMBADA (EleutherAI/lambada_openai, split test)
def lambada_openai(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    rows = _jsonl(_root(data_root) / "lambada-openai-test" / "lambada_test.jsonl")
    return _split("lambada_openai", "test", [{"text": r["text"]} for r in rows], zeroshot)


# ---------------------------------------------------------------- OpenBookQA (allenai/openbookqa main, split test)
def openbookqa(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    rows = _jsonl(_root(data_root) / "openbookqa-main-test" / "test.jsonl")
    return _split("openbookqa", "test", [{"id": r["id"], "question_stem": r["question"]["stem"],
                                          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                                      "label": [c["label"] for c in r["question"]["choices"]]},
                                          "answerKey": r["answerKey"]} for r in rows], zeroshot)


# ---------------------------------------------------------------- PIQA (baber/piqa, split validation)
def piqa(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    d = _root(data_root) / "piqa-val"
    rows = _jsonl(d / "valid.jsonl")
    labels = [int(x) for x in (d / "valid-labels.lst").read_text().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{d}: {len(rows)} items but {len(labels)} labels")
    return _split("piqa", "validation", [dict(r, label=y) for r, y in zip(rows, labels)], zeroshot)


# ---------------------------------------------------------------- SST-2 (nyu-mll/glue sst2, split validation)
def sst2(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    with open(_root(data_root) / "sst2-glue-dev" / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows[0] != ["sentence", "label"]:
        raise ValueError(f"sst2 dev.tsv: unexpected header {rows[0]}")
    # GLUE's sentences keep their trailing space (HF's loader reads the same TSV): kept, as the built-in task sees it
    docs = [{"sentence": s, "label": int(y), "idx": i} for i, (s, y) in enumerate(rows[1:])]
    return _split("sst2", "validation", docs, zeroshot)


# ---------------------------------------------------------------- WinoGrande (allenai/winogrande xl, validation)
def winogrande(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    rows = _jsonl(_root(data_root) / "winogrande-dev" / "dev.jsonl")
    return _split("winogrande", "validation", [{k: r[k] for k in ("sentence", "option1", "option2", "answer")}
                                               for r in rows], zeroshot)


# ---------------------------------------------------------------- HellaSwag (Rowan/hellaswag, split validation)
# The local file is klosax's text export of the official hellaswag_val.jsonl: 6 lines per item, "activity_label: ctx"
# (ctx = ctx_a + " " + ctx_b, wikiHow markers already stripped), the gold label, the 4 endings. lm-eval's query needs
# ctx_a and ctx_b apart (it capitalises ctx_b), so they are recovered: wikiHow items have ctx_b == "" (their contexts
# are whole sentences), ActivityNet items end in ctx_b, the lower-case start of the next sentence after the last
# sentence end. wikiHow items are told apart by their activity label: wikiHow's categories (plus the two odd labels
# in the val set) versus ActivityNet's action classes.
WIKIHOW_LABELS = frozenset({
    "Arts and Entertainment", "Cars & Other Vehicles", "Computers and Electronics", "Education and Communications",
    "Family Life", "Finance and Business", "Food and Entertaining", "Health", "Hobbies and Crafts",
    "Holidays and Traditions", "Home and Garden", "Personal Care and Style", "Pets and Animals",
    "Philosophy and Religion", "Relationships", "Sports and Fitness", "Travel", "Work World", "Youth",
    "Uncategorized", "Home,Categories",
})
_LAST_SENTENCE_END = re.compile(r'^(.*[.!?]["\']?) (\S.*)$')


def split_ctx(activity_label: str, ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context as the HF split has them (see the note above)."""
    if activity_label in WIKIHOW_LABELS:
        return ctx, ""
    m = _LAST_SENTENCE_END.match(ctx)
    return (m.group(1), m.group(2)) if m else ("", ctx)


@functools.lru_cache(maxsize=2)
def _hellaswag_rows(path: Path) -> tuple[dict, ...]:
    # decompressing the 2 MB .bz2 takes ~0.7 s: read once per process
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not 6 per item")
    rows = []
    for i in range(0, len(lines), 6):
        label, ctx = lines[i].split(": ", 1)
        ctx_a, ctx_b = split_ctx(label, ctx)
        rows.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": lines[i + 2: i + 6], "label": lines[i + 1]})
    return tuple(rows)


def hellaswag(data_root: str | None = None, zeroshot: dict | None = None, **_) -> datasets.DatasetDict:
    rows = _hellaswag_rows(_root(data_root) / "hellaswag-val" / "hellaswag_val_full.txt.bz2")
    # lm-eval's process_docs (query, choices, gold beside the HF fields) applied here to the chosen items only, not
    # in the YAML: lm-eval re-runs a YAML process_docs on the whole split each time it reads it (4 times per call)
    return _split("hellaswag", "validation", list(rows), zeroshot, to_doc=lambda r: dict(r, **_hellaswag_doc(r)))


# ---------------------------------------------------------------- verbatim from lm-eval 0.4.13
# lm_eval/tasks/hellaswag/utils.py
def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


# lm_eval/tasks/hellaswag/utils.py, process_docs._process_doc
def _hellaswag_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    out_doc = {
        "query": preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }
    return out_doc


# lm_eval/tasks/winogrande/preprocess_winogrande.py, doc_to_text / doc_to_target / doc_to_choice
def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
