"""Zero-shot accuracy beside perplexity: EleutherAI's lm-evaluation-harness (lm-eval 0.4.x) as the engine, over
local copies of the task data (data/<dir>/, each with its SOURCE.md), never a hub.

Tasks: the YAMLs in pipeline/zeroshot_tasks/ are lm-eval 0.4.13's own task definitions (same doc_to_text / doc_to_choice /
target / metrics, same names: `hellaswag`, `arc_easy`, ...) with only the data source swapped for a loader that reads
the local files into the Hugging Face split's rows and order (pipeline/zeroshot_tasks/local.py). lm-eval's built-in tasks are
not indexed (include_defaults=False), so each name resolves to the local version only, and no task can reach a hub.
The one content difference from the built-ins: HellaSwag's local file is a text export of the official jsonl, from
which ctx_a / ctx_b are rebuilt before lm-eval's own preprocessing (see local.py).

The model: `HarnessLM` wraps a `pipeline.models.LM`, so the harness scores the node exactly as the pipeline
evaluates it: every forward is `LM.logits`, i.e. LoRA inside the PeftModel, the bottleneck adapters' hooks, the
soft prompt prepended (its positions dropped), NF4 / GPTQ bases through their kernels. Tokenization, the
context/continuation split and the scoring follow lm-eval's HFLM (huggingface.py) step for step.

Subsets: `limit` items are a seeded sample of the task's items (random.Random(f"{seed}:{task}"), sorted into doc
order), the same for every node with the same seed, so nodes pair item by item; lm-eval's own `limit` would take the
first N, and HellaSwag's and WinoGrande's first items come in runs from one source. The full set when limit is None.
The loaders cut the split to the sample (lm-eval's evaluate(samples=...) would decode every row of the full splits
three times: ~5 s a call); each doc keeps `doc_index`, its index in the full split.

Speed, measured on this project's 2-core CPU (fp32, batch_size 8, other load off), forward-bound: the tiny test
Llama (2 layers, hidden 128) ~130 items/s over the nine tasks (450 items in 3.4 s, loading included); SmolLM2-135M
~5.3 items/s over the nine tasks (180 items in 34 s, ~15 loglikelihood requests/s), per task: HellaSwag ~2,
ARC-Easy / -Challenge ~4, BoolQ ~5, PIQA and LAMBADA ~6.5, WinoGrande, OpenBookQA and SST-2 ~13 items/s. A budget of
10-20 s per node is ~50-100 items (e.g. 10 per task: ~17 s), on which a 0/1 accuracy's 95% interval is +-10-14
points: hence "lls" per item, a continuous paired measure. Importing lm-eval costs ~0.5 s, loading a task 0.1-0.3 s
(HellaSwag ~1.3 s: its .bz2 is decompressed once per process). Batch size 4 and 16 were slower.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm_eval import evaluator
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .models import LM
from .zeroshot_tasks.local import SIZES, sample_ids

TASK_DIR = Path(__file__).resolve().parent / "zeroshot_tasks"
TASKS: list[str] = list(SIZES)  # hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, lambada_openai,
#                                 openbookqa, sst2: lm-eval's names for the same task definitions


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns for every task with a custom loader that kwargs can come from --metadata: noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


# Every node of a comparison asks lm-eval to tokenize the same contexts and continuations (~25k strings for 9 tasks x
# 500 items: 5.2 s of a 28 s call, bench/results/zeroshot_profile_cpu.txt). A process that evaluates several nodes
# (a DVC-less run, a GPU worker) encodes each string once per tokenizer: keyed by the tokenizer's full definition,
# so nodes whose artifacts carry equal tokenizers share entries and a different tokenizer never does.
_ENCODED: dict[tuple[str, bool | None, str], tuple[int, ...]] = {}
_ENCODED_MAX = 200_000  # entries (~100 MB at most); cleared when full


def _tokenizer_key(tokenizer) -> str | None:
    """A digest of everything that decides a fast tokenizer's ids (None: not cacheable, e.g. a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    flags = [type(tokenizer).__name__] + [str(getattr(tokenizer, k, None)) for k in ("add_bos_token", "add_eos_token")]
    return hashlib.sha256("\0".join([*flags, backend.to_str()]).encode()).hexdigest()


class HarnessLM(TemplateLM):
    """A `pipeline.models.LM` as an lm-eval model: loglikelihood (batched) and loglikelihood_rolling."""

    def __init__(self, lm: LM, batch_size: int = 8):
        super().__init__()
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.batch_size = max(1, int(batch_size))
        # the soft prompt and the prefix take positions too: keep them + sequence within the trained context
        self.max_length = (int(getattr(lm.base.config, "max_position_embeddings", None) or 2048)
                           - lm.n_prompt - lm.n_prefix)
        self._prefix_text = self.tokenizer.decode(self.prefix_token_id)
        self._tokenizer_key = _tokenizer_key(self.tokenizer)  # ~40 ms for a 49k vocabulary

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM: BOS if the tokenizer has one, else EOS (the context of an empty-context request)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # HFLM.tok_encode with add_bos_token unset: the tokenizer's own default, unless the text starts with BOS
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self._prefix_text):
            kw["add_special_tokens"] = False
        if self._tokenizer_key is None:
            return self.tokenizer.encode(string, **kw)
        key = (self._tokenizer_key, kw.get("add_special_tokens"), string)
        ids = _ENCODED.get(key)
        if ids is None:
            if len(_ENCODED) >= _ENCODED_MAX:
                _ENCODED.clear()
            ids = _ENCODED[key] = tuple(self.tokenizer.encode(string, **kw))
        return list(ids)  # (a fresh list: the caller may change it)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), whether the continuation is the greedy one) per request.

        As HFLM: the input is (context + continuation)[-(max_length + 1):][:-1], right-padded; requests with the
        same input (several one-token continuations of one context: BoolQ, SST-2) share one forward; inputs run
        longest first, `batch_size` per forward, so a batch pads little."""
        groups: dict[tuple[int, ...], list[int]] = {}
        conts: list[list[int]] = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("loglikelihood request with an empty context or continuation")
            groups.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), []).append(i)
            conts.append(cont)
        order = sorted(groups, key=lambda t: (-len(t), t))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), desc="zero-shot", unit="req", leave=False, disable=disable_tqdm)
        for b in range(0, len(order), self.batch_size):
            batch = order[b: b + self.batch_size]
            ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)  # right-padded (longest first)
            for row, inp in enumerate(batch):
                ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            # the logits that predict each continuation's tokens (the last len(cont) real positions of its row),
            # scored for the whole batch at once: the lm_head only on the columns some row needs, one log-softmax
            # over those rows and one transfer back (a log-softmax and two syncs per request cost more than the
            # forward on GPU)
            rows, cols, targets, spans = [], [], [], []
            for row, inp in enumerate(batch):
                for i in groups[inp]:
                    cont = conts[i]
                    spans.append((i, len(targets), len(targets) + len(cont)))
                    rows += [row] * len(cont)
                    cols += range(len(inp) - len(cont), len(inp))
                    targets += cont
            keep = sorted(set(cols))
            at = {c: k for k, c in enumerate(keep)}
            dev = self.lm.device
            logits = self.lm.logits(ids, torch.tensor(keep, device=dev))  # [batch, len(keep), vocab]
            logp = F.log_softmax(logits[torch.tensor(rows, device=dev),
                                        torch.tensor([at[c] for c in cols], device=dev)].float(), dim=-1)
            target = torch.tensor(targets, dtype=torch.long, device=dev)
            token_ll = logp.gather(-1, target[:, None])[:, 0].cpu()
            greedy = (logp.argmax(-1) == target).cpu()
            for i, a, b in spans:  # summed per request as HFLM sums (one tensor per continuation)
                out[i] = (token_ll[a:b].sum().item(), bool(greedy[a:b].all()))
            bar.update(len(spans))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, summed over disjoint windows of max_length (HFLM's scheme)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("no supported zero-shot task generates text (lambada_openai scores the greedy "
                                  "continuation by loglikelihood)")


def task_manager(*, data_root: str | Path | None = None, limits: dict[str, int | None] | None = None,
                 seed: int = 0) -> TaskManager:
    """lm-eval's TaskManager over pipeline/zeroshot_tasks only (no built-in task is indexed, so none can reach a hub). Its
    metadata reaches the loaders: `data_root` replaces data/; `limits` + `seed` cut each split to its sample."""
    meta: dict = {"zeroshot": {"seed": seed, "limits": dict(limits or {})}}
    if data_root:
        meta["data_root"] = str(data_root)
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)


@contextlib.contextmanager
def _cached_templates():
    """lm-eval compiles a Jinja template from its source on every doc_to_text / doc_to_target / doc_to_choice call
    (~1 ms each: 2 s of a 450-item call). Compile each source once; the rendering is lm-eval's own, unchanged."""
    original = getattr(lm_eval_utils, "apply_template", None)
    if original is None or not hasattr(lm_eval_utils, "env"):  # another lm-eval layout: leave it as it is
        yield
        return
    compiled = functools.lru_cache(maxsize=256)(lm_eval_utils.env.from_string)
    lm_eval_utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        lm_eval_utils.apply_template = original


def evaluate_zeroshot(lm: LM, tasks: dict[str, int | None], *, batch_size: int = 8, seed: int = 0,
                      data_root: str | Path | None = None) -> dict:
    """Zero-shot accuracy of `lm` on each task (name -> number of items, None for the full set) via lm-eval.

    Returns per task {"acc", "acc_norm" (tasks that have it), "n", "items" (0/1 per item for "metric", in doc
    order), "items_norm" (per-item acc_norm, where it exists), "metric": "acc", "lls" (per item, the log-likelihood of
    each choice; lambada_openai: of its target), "gold" (per item, the correct choice's index; multiple-choice tasks),
    "doc_ids" (the evaluated items' indices in the full split), "size" (items in the full split), "seconds"} and, for
    lambada_openai, "perplexity". Per-item values are lm-eval's logged samples (log_samples=True), not recomputed."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; supported: {TASKS}")
    for name, limit in tasks.items():
        sample_ids(name, SIZES[name], limit, seed)  # a limit < 1 fails here, before any loading
    if not tasks:
        return {}
    t0 = time.perf_counter()
    with _cached_templates():
        # the loaders cut each split to its sample (pipeline/zeroshot_tasks/local.py says why not evaluate(samples=...))
        loaded = task_manager(data_root=data_root, limits=tasks, seed=seed).load(list(tasks))
        model = HarnessLM(lm, batch_size=batch_size)
        was_training = lm.model.training
        lm.model.eval()
        try:
            # bootstrap_iters=0: no stderr from lm-eval; the report bootstraps over the per-item values itself
            res = evaluator.evaluate(lm=model, task_dict=loaded, bootstrap_iters=0, log_samples=True)
        finally:
            lm.model.train(was_training)
    seconds = round(time.perf_counter() - t0, 2)

    out = {}
    for name in tasks:
        logged = sorted(res["samples"][name], key=lambda s: s["doc"]["doc_index"])
        agg = res["results"][name]
        entry: dict = {"metric": "acc", "acc": float(agg["acc,none"]), "n": len(logged),
                       "items": [int(s["acc"]) for s in logged]}
        if "acc_norm,none" in agg:
            entry["acc_norm"] = float(agg["acc_norm,none"])
            entry["items_norm"] = [int(s["acc_norm"]) for s in logged]
        if "perplexity,none" in agg:
            entry["perplexity"] = float(agg["perplexity,none"])
        # the raw scores behind the 0/1 items, as lm-eval logged them: a paired comparison of nodes on a continuous
        # per-item value (e.g. the gold choice's margin) needs far fewer items than one on accuracy
        entry["lls"] = [[round(float(r[0]), 6) for r in s["filtered_resps"]] for s in logged]
        task = loaded["tasks"][name]
        if task.OUTPUT_TYPE == "multiple_choice":  # the index acc compares against (WinoGrande: its doc_to_text)
            entry["gold"] = [int(task.doc_to_text(s["doc"]) if task.multiple_input else s["target"]) for s in logged]
        entry["doc_ids"] = [int(s["doc"]["doc_index"]) for s in logged]
        entry["size"] = SIZES[name]
        if entry["doc_ids"] != (sample_ids(name, SIZES[name], tasks[name], seed) or list(range(SIZES[name]))):
            raise RuntimeError(f"{name}: lm-eval evaluated other items than the seeded sample")
        entry["seconds"] = seconds  # all tasks run in one pass of the harness: the time of the whole call
        # lm-eval's aggregate and the per-item values must agree, or the bootstrap would describe another number
        if not math.isclose(entry["acc"], sum(entry["items"]) / max(1, entry["n"]), abs_tol=1e-9):
            raise RuntimeError(f"{name}: lm-eval's acc {entry['acc']} differs from the mean of its logged items")
        out[name] = entry
    return out
