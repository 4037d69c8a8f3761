"""Evaluation that can decide: faithful corpora (pinned streams), per-window NLLs batched, bootstrap intervals, and
advice that names a winner only when the paired difference is significant."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from pipeline import data, report, stats
from pipeline.config import load_params

# sha256 of each evaluation / training stream of the default params, and its first characters: a change of reading
# convention (line breaks doubled, rows joined differently, a split moved) cannot pass silently.
PINNED = {
    "wikitext2": ("696cca6b65a171b0", 1294336, "\n\n = Robert Boulter = \n\n\n\n\n Robert Boult"),
    "domain_train": ("9e2b074a547cbfd3", 1003856, "First Citizen:\nBefore we proceed any fur"),
    "domain_heldout": ("8da17b632681ba1c", 111538, "\nGREMIO:\nGood morrow, neighbour Baptista"),
    "calibration": ("4f9e1a19d11b31bc", 2191455, "Beginners BBQ Class Taking Place in Miss"),
}


def _streams() -> dict[str, str]:
    params = load_params(ROOT / "params.yaml")
    train, heldout = data.domain_split(params.data.domain)
    return {"wikitext2": data.corpus_text(params.data.eval["wikitext2"]), "domain_train": train, "domain_heldout": heldout,
            "calibration": data.corpus_text(params.data.calibration)}


def test_evaluation_streams_are_pinned():
    got = {k: (hashlib.sha256(v.encode()).hexdigest()[:16], len(v), v[:40]) for k, v in _streams().items()}
    assert got == PINNED, got


def test_wikitext_follows_the_hf_split_convention():
    text = _streams()["wikitext2"]
    lines = (ROOT / "data" / "wikitext2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    assert text == "\n\n".join(line if line.strip() else "" for line in lines)  # GPTQ / Wanda / SparseGPT


def test_plain_text_is_read_as_it_is():
    train, heldout = _streams()["domain_train"], _streams()["domain_heldout"]
    raw = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()
    assert train + heldout == raw and "\n\n\n" not in raw[:5000]  # no doubled line breaks
    assert train.endswith("\n")  # the split falls at a line start


def test_batched_windows_equal_one_at_a_time(tiny_model):
    from pipeline.config import ModelCfg
    from pipeline.models import LM, load_base
    from pipeline.stages.evaluate import window_nlls

    cfg = ModelCfg(source=str(tiny_model), device="cpu")
    model, tok = load_base(tiny_model, "hf", cfg, torch.device("cpu"))
    lm = LM(model, tok, None, torch.device("cpu"))
    ids = torch.randint(0, len(tok), (64 * 7,))
    one = window_nlls(lm, ids, 64, batch_size=1)
    batched = window_nlls(lm, ids, 64, batch_size=4)  # 4 + 3: a ragged last batch too
    assert len(one) == 7 and np.allclose(one, batched, atol=1e-5)
    with torch.no_grad():  # and equal to the model's own mean loss per window
        ref = [lm.loss(w[None]).item() for w in ids.view(7, 64)]
    assert np.allclose(one, ref, atol=1e-5)


def test_token_nlls_chunked_equals_one_call(monkeypatch):
    """The evaluation's cross-entropy, a few sequences at a time (bounded memory), equals one call on the whole
    batch, ignored targets included, whatever the chunk boundaries."""
    from pipeline.stages import evaluate as ev

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 16, 300, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 300, (7, 16), generator=gen)
    targets[:, -1] = -100
    targets[3, :5] = -100
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                                            ignore_index=-100).view(7, 16)
    for chunk_tokens in (16, 48, 10_000):  # 1 sequence, 3 (a ragged last chunk), all at once
        monkeypatch.setattr(ev, "CE_CHUNK_TOKENS", chunk_tokens)
        got = ev.token_nlls(logits, targets)
        assert torch.equal(got, ref)
    assert (got[3, :5] == 0).all() and (got[:, -1] == 0).all()


# ---------------------------------------------------------------- bootstrap on known inputs
def test_ppl_interval_covers_and_shrinks():
    rng = np.random.default_rng(0)
    few, many = rng.normal(3.0, 0.3, 8), rng.normal(3.0, 0.3, 800)
    a, b = stats.ppl_interval(list(few)), stats.ppl_interval(list(many))
    assert a.lo < a.estimate < a.hi and b.lo < math.exp(3.0) < b.hi
    assert (b.hi - b.lo) < (a.hi - a.lo) / 5  # ~ 1/sqrt(n)
    assert stats.ppl_interval([2.0] * 5).as_list() == [round(math.exp(2), 4)] * 3  # no spread, no width


def test_accuracy_interval_matches_the_normal_approximation():
    items = [1.0] * 300 + [0.0] * 700
    iv = stats.mean_interval(items)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 1000)
    assert iv.estimate == pytest.approx(0.3) and iv.lo == pytest.approx(0.3 - half, abs=0.006) and iv.hi == pytest.approx(0.3 + half, abs=0.006)


def test_paired_difference_sees_what_unpaired_intervals_hide():
    rng = np.random.default_rng(1)
    windows = rng.normal(3.0, 0.5, 40)  # windows differ a lot; node b is uniformly 1% worse in NLL
    a, b = list(windows), list(windows + 0.01)
    ia, ib = stats.ppl_interval(a), stats.ppl_interval(b)
    assert ia.hi > ib.lo  # the marginal intervals overlap ...
    d = stats.paired_ppl_diff(a, b)
    assert d.significant and d.lo > 0  # ... the paired difference does not include 0
    noise = list(windows + rng.normal(0, 0.05, 40))
    assert not stats.paired_ppl_diff(a, noise).significant
    with pytest.raises(ValueError, match="same windows"):
        stats.paired_ppl_diff(a, a[:-1])


def test_paired_accuracy_difference():
    a = [1.0, 0.0] * 200
    assert not stats.paired_mean_diff(a, a).significant
    b = [1.0, 1.0] * 200
    d = stats.paired_mean_diff(a, b)
    assert d.estimate == pytest.approx(0.5) and d.significant


# ---------------------------------------------------------------- significance wording in the advice
def _row(node: str, nll: list[float], chain: tuple[str, ...] = ("x",), kind: str = "peft") -> dict:
    return {"node": node, "chain": list(chain), "kind": kind, "ppl": {"domain_heldout": math.exp(sum(nll) / len(nll))},
            "nll_per_window": {"domain_heldout": nll}, "size": {"bytes": 100}, "flags": []}


def test_advice_names_a_winner_only_when_significant():
    rng = np.random.default_rng(2)
    w = rng.normal(3.0, 0.4, 30)
    best, close, far = _row("a", list(w)), _row("b", list(w + rng.normal(0.002, 0.03, 30))), _row("c", list(w + 0.3))
    line = report.winner([best, close, far], ["a", "b", "c"], "domain_heldout", "Best")
    assert "no single winner" in line and "`a`" in line and "`b`" in line and "rest are significantly worse" in line
    line = report.winner([best, far], ["a", "c"], "domain_heldout", "Best")
    assert "**`a`**" in line and "significantly better than every other" in line and "*" in line


def test_diff_formatting():
    assert report.fmt_diff(stats.Interval(1.0, 0.5, 1.5)) == "+1.00 [+0.50, +1.50] *"
    assert report.fmt_diff(stats.Interval(0.1, -0.2, 0.4)).endswith("n.s.")


def test_config_knows_the_zeroshot_tasks():
    from pipeline.config import ZEROSHOT_TASKS
    from pipeline.zeroshot import TASKS

    assert sorted(ZEROSHOT_TASKS) == sorted(TASKS)


# ---------------------------------------------------------------- the PEFT ablation section
def _peft_row(node: str, nlls: list[list[float]], trainable: int) -> dict:
    r = _row(node, nlls[0], chain=(node,))
    r["train"] = {"seed": 0, "trainable_params": trainable, "tokens_per_s": 100.0, "peak_memory_mb": 10.0}
    r["train_seeds"] = [dict(r["train"], seed=i) for i in range(len(nlls))]
    r["seeds"] = {str(i): {"ppl": {"domain_heldout": math.exp(sum(n) / len(n))}, "nll_per_window": {"domain_heldout": n}}
                  for i, n in enumerate(nlls[1:], 1)}
    return r


def test_ablation_says_whether_the_combination_beats_the_best_single_method():
    rng = np.random.default_rng(3)
    w = rng.normal(3.0, 0.4, 40)
    seeds = lambda shift: [list(w + shift + rng.normal(0, 0.01, 40)) for _ in range(3)]  # noqa: E731
    base = _row("base", list(w), chain=(), kind="base")
    rows = [base, _peft_row("lora", seeds(-0.10), 100), _peft_row("prompt", seeds(-0.05), 10),
            _peft_row("lora_prompt", seeds(-0.20), 110)]
    methods = {"lora": ["lora"], "prompt": ["prompt"], "lora_prompt": ["lora", "prompt"]}
    text = "\n".join(report.ablation(rows, methods, ["domain_heldout"]))
    assert "`lora_prompt` (lora+prompt) **beats** the best single method `lora`" in text
    assert text.count("\n| `") == 3 and "± " in text          # one row per subset, mean ± sd over the 3 seeds
    assert "Adding the prompt on the plain base" in text
    rows[3] = _peft_row("lora_prompt", seeds(-0.10), 110)      # the same as LoRA alone: no claim of a win
    text = "\n".join(report.ablation(rows, methods, ["domain_heldout"]))
    assert "**is tied with**" in text and "LoRA leaves it little to add" in text
    assert report.ablation(rows[:2], {"lora": ["lora"]}, ["domain_heldout"]) == []
