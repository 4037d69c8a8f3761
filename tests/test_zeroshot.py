"""Zero-shot tasks through lm-eval over the local data: every task loads its full split from data/ with pinned
content, the task definitions are lm-eval's own, and the harness scores a node exactly as the pipeline sees it
(LoRA, adapters, soft prompt), batched or not."""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from pipeline import zeroshot
from pipeline.zeroshot_tasks import local

# Full split sizes (the HF splits lm-eval's built-in tasks read; each data dir's SOURCE.md) and, over the whole split,
# the sha256 of every doc as the task renders it ([doc_to_text, doc_to_target, doc_to_choice] as JSON lines), plus the
# first doc: a change of reading convention, field or template cannot pass silently.
PINNED = {
    "hellaswag": (10042, "423ccc261ad4d208", ("Roof shingle removal: A man is sitting on a roof. He", 3,
                                              ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                               "is holding a rubik's cube.", "starts pulling up roofing on a roof."])),
    "arc_easy": (2376, "2b3b15dfa7de73a5", ("Question: Which statement best explains why photosynthesis is the "
                                            "foundation of most food webs?\nAnswer:", 0, None)),
    "arc_challenge": (1172, "e5deb900d5829659", ("Question: An astronomer observes that a planet rotates faster after "
                                                 "a meteorite impact. Which is the most likely effect of this increase "
                                                 "in rotation?\nAnswer:", 2, None)),
    "piqa": (1838, "ea72dd6f4b69dec9", ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                                        0, None)),
    "winogrande": (1267, "7d2b1f5d7ec42e92", (1, "always got the easier cases.",
                                              ["Sarah was a much better surgeon than Maria so Sarah",
                                               "Sarah was a much better surgeon than Maria so Maria"])),
    "boolq": (3270, "105a68fe7fc237b1", (None, 0, ["no", "yes"])),
    "lambada_openai": (5153, "e0c2543d5e33b48b", (None, " signs", None)),
    "openbookqa": (500, "483b645e1c4d7a4a", (None, 1, ["make more phone calls", "quit eating lunch out",
                                                       "buy less with monopoly money", "have lunch with friends"])),
    "sst2": (872, "95c9a5b584b554d8", ("it 's a charming and often affecting journey . \nQuestion: Is this sentence "
                                       "positive or negative?\nAnswer:", 1, ["negative", "positive"])),
}
# sha256 of the data files the tasks read (as in each SOURCE.md)
FILES = {
    "hellaswag-val/hellaswag_val_full.txt.bz2": "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
    "ai2-arc-test/ARC-Easy-Test.jsonl": "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    "ai2-arc-test/ARC-Challenge-Test.jsonl": "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    "piqa-val/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa-val/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "winogrande-dev/dev.jsonl": "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8",
    "boolq-superglue-val/val.jsonl": "21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989",
    "lambada-openai-test/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "openbookqa-main-test/test.jsonl": "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313",
    "sst2-glue-dev/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
}
# lm-eval's own definition of each task (lm_eval/tasks/...), which ours must equal but for the data source
BUILTIN = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
           "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
           "boolq": "super_glue/boolq/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
           "openbookqa": "openbookqa/openbookqa.yaml", "sst2": "glue/sst2/default.yaml"}


def _rendered(task) -> tuple[int, str, tuple]:
    h, first, n = hashlib.sha256(), None, 0
    for doc in task.eval_docs:
        rec = (task.doc_to_text(doc), task.doc_to_target(doc),
               task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None)
        h.update(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        first = rec if first is None else first
        n += 1
    return n, h.hexdigest()[:16], first


def test_task_list_and_data_files_are_pinned():
    assert zeroshot.TASKS == list(PINNED)
    assert {t: n for t, (n, _, _) in PINNED.items()} == local.SIZES
    for rel, sha in FILES.items():
        assert hashlib.sha256((ROOT / "data" / rel).read_bytes()).hexdigest() == sha, rel
        assert (ROOT / "data" / rel.split("/")[0] / "SOURCE.md").is_file()


@pytest.mark.parametrize("name", list(PINNED))
def test_task_loads_its_full_split_from_the_local_files(name):
    size, digest, (text, target, choices) = PINNED[name]
    with zeroshot._cached_templates():
        task = zeroshot.task_manager().load([name])["tasks"][name]
        n, got_digest, (got_text, got_target, got_choices) = _rendered(task)
    assert n == size
    assert (text is None or got_text == text) and got_target == target
    assert choices is None or got_choices == choices
    assert got_digest == digest


def test_a_changed_data_file_fails_loudly(tmp_path):
    (tmp_path / "sst2-glue-dev").mkdir()
    lines = (ROOT / "data" / "sst2-glue-dev" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "sst2-glue-dev" / "dev.tsv").write_text("".join(lines[:-1]), encoding="utf-8")  # one item lost
    with pytest.raises(ValueError, match="871 items, the split 872"):
        zeroshot.task_manager(data_root=tmp_path).load(["sst2"])


@pytest.mark.parametrize("name", list(PINNED))
def test_task_definition_is_lm_evals_own(name):
    """Same output type, prompt, target, choices, metrics, split and version as lm-eval's built-in YAML."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN[name], resolve_func=False)
    ours = load_yaml(zeroshot.TASK_DIR / f"{name}.yaml", resolve_func=False)
    assert ours["task"] == builtin["task"] == name
    split = "test_split" if builtin.get("test_split") else "validation_split"
    assert ours[split] == builtin[split]
    for key in ("output_type", "target_delimiter", "fewshot_delimiter", "should_decontaminate",
                "doc_to_decontamination_query"):
        assert ours.get(key) == builtin.get(key), key
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if name == "winogrande":  # functions: ours are copies of its preprocess_winogrande.py
            continue
        assert ours.get(key) == builtin.get(key), key
    defaults = {"aggregation": "mean", "higher_is_better": True}
    assert [defaults | m for m in ours["metric_list"]] == [defaults | m for m in builtin["metric_list"]]
    assert ours["metadata"]["version"] == builtin["metadata"]["version"]
    assert "dataset_path" in ours and "custom_dataset" in ours  # the data source is the one thing swapped


def test_copied_task_code_behaves_as_lm_evals():
    from lm_eval.tasks.winogrande import preprocess_winogrande as wino

    task = zeroshot.task_manager().load(["winogrande"])["tasks"]["winogrande"]
    for doc in list(task.eval_docs)[:200]:
        assert local.winogrande_doc_to_text(doc) == wino.doc_to_text(doc)
        assert local.winogrande_doc_to_target(doc) == wino.doc_to_target(doc)
        assert local.winogrande_doc_to_choice(doc) == wino.doc_to_choice(doc)
    from lm_eval.tasks.hellaswag import utils as hs

    assert inspect.getsource(local.preprocess) == inspect.getsource(hs.preprocess)


def test_hellaswag_docs_are_lm_evals_process_docs_of_the_rebuilt_hf_rows():
    """The local text export is turned back into HF rows (ctx_a / ctx_b apart); lm-eval's own process_docs on those
    rows gives exactly the docs the task evaluates; and the known first HF row is rebuilt as it is."""
    import datasets
    from lm_eval.tasks.hellaswag import utils as hs

    rows = local._hellaswag_rows(local.DATA_ROOT / "hellaswag-val" / "hellaswag_val_full.txt.bz2")
    assert {k: rows[0][k] for k in ("activity_label", "ctx_a", "ctx_b", "label")} == {
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "label": "3"}
    assert sum(1 for r in rows if r["ctx_b"]) == 3243  # the ActivityNet items; the 6,799 wikiHow ones have ctx_b ""
    ids = local.sample_ids("hellaswag", len(rows), 300, seed=1)
    reference = hs.process_docs(datasets.Dataset.from_list([rows[i] for i in ids]))
    docs = local.hellaswag(zeroshot={"seed": 1, "limits": {"hellaswag": 300}})["validation"]
    assert [d["doc_index"] for d in docs] == ids
    for ref, doc in zip(reference, docs):
        assert (doc["query"], doc["choices"], doc["gold"]) == (ref["query"], ref["choices"], ref["gold"])


def test_subsets_are_seeded_samples_the_same_for_every_call():
    a = local.sample_ids("arc_easy", 2376, 50, seed=0)
    assert a == local.sample_ids("arc_easy", 2376, 50, seed=0) == sorted(set(a)) and len(a) == 50
    assert a != local.sample_ids("arc_easy", 2376, 50, seed=1) != local.sample_ids("arc_challenge", 2376, 50, seed=0)
    assert a[-1] > 500  # spread over the split, not its first items
    assert local.sample_ids("arc_easy", 2376, None, 0) is None and local.sample_ids("arc_easy", 2376, 5000, 0) is None
    with pytest.raises(ValueError, match=">= 1"):
        local.sample_ids("arc_easy", 2376, 0, 0)
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        zeroshot.evaluate_zeroshot(None, {"mmlu": 5})


# ---------------------------------------------------------------- the harness on the tiny model
LIMITS = {"arc_easy": 6, "winogrande": 3, "boolq": 2, "lambada_openai": 3}


def _lm(tiny_model, methods: list[str] | None = None, randomize: bool = False, nf4: bool = False):
    from pipeline.config import ModelCfg, PeftCfg
    from pipeline.models import LM, load_base
    from pipeline.stages.peft import add_peft

    cfg = ModelCfg(source=str(tiny_model), device="cpu")
    if nf4:  # the NF4 base a quantize stage makes, in memory: bitsandbytes' kernels in every forward
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.config import QuantMethodCfg
        from pipeline.stages.quantize import bnb_config

        qcfg = bnb_config(QuantMethodCfg(method="nf4"), torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=qcfg, dtype=torch.float32,
                                                     device_map={"": "cpu"}).eval()
        tok = AutoTokenizer.from_pretrained(tiny_model)
    else:
        model, tok = load_base(tiny_model, "hf", cfg, torch.device("cpu"))
    lm = LM(model, tok, None, torch.device("cpu"))
    if methods:
        add_peft(lm, PeftCfg(kind="peft", methods=methods, adapter_dim=16, prompt_tokens=4), seed=0)
        if randomize:  # as after training: LoRA B and the adapters' up projections away from their zero init
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in list(lm.model.named_parameters()) + list(lm.hybrid.named_parameters() if lm.hybrid else []):
                    if "lora_B" in name or ".up." in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return lm


@pytest.fixture(scope="module")
def requests_():
    """The loglikelihood requests lm-eval builds for a few items of four tasks (both output types, one-token and
    multi-token continuations, multiple contexts per item)."""
    loaded = zeroshot.task_manager(limits=LIMITS).load(list(LIMITS))["tasks"]
    reqs = []
    for task in loaded.values():
        task.build_all_requests()
        reqs += task.instances
    return reqs


def _lls(lm, reqs, batch_size: int = 8) -> np.ndarray:
    return np.array([ll for ll, _ in zeroshot.HarnessLM(lm, batch_size=batch_size).loglikelihood(reqs, disable_tqdm=True)])


def test_batched_loglikelihood_equals_one_request_at_a_time(tiny_model, requests_):
    lm = _lm(tiny_model, ["lora", "adapter", "prompt"], randomize=True)  # the soft prompt shifts every position
    batched = zeroshot.HarnessLM(lm, batch_size=8).loglikelihood(requests_, disable_tqdm=True)
    single = zeroshot.HarnessLM(lm, batch_size=1).loglikelihood(requests_, disable_tqdm=True)
    assert len(batched) == len(requests_) > 30
    assert np.allclose([b[0] for b in batched], [s[0] for s in single], atol=1e-4, rtol=1e-5)
    assert [b[1] for b in batched] == [s[1] for s in single]


@pytest.mark.parametrize("methods", [[], ["lora", "adapter", "prompt"], ["prefix"]], ids=["plain", "prompt", "prefix"])
def test_logits_at_positions_are_those_columns_of_the_full_logits(tiny_model, methods):
    """LM.logits(ids, positions) runs the lm_head on those columns only (what zero-shot scoring asks for), and gives
    exactly those columns of the full logits, behind a soft prompt or a prefix as on a plain model."""
    lm = _lm(tiny_model, methods, randomize=bool(methods))
    ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 5, 11, 16])
    with torch.no_grad():
        full, some = lm.logits(ids), lm.logits(ids, positions)
    assert some.shape == (3, 4, full.shape[-1])
    torch.testing.assert_close(some, full[:, positions], rtol=1e-5, atol=1e-5)


def test_plain_model_scores_as_lm_evals_own_hf_model(tiny_model, requests_):
    """On a model without PEFT parts the wrapper gives what lm-eval's HFLM gives: same tokenization, same split of
    context and continuation, same logits, same greedy flags."""
    from lm_eval.models.huggingface import HFLM

    ours = zeroshot.HarnessLM(_lm(tiny_model)).loglikelihood(requests_, disable_tqdm=True)
    theirs = HFLM(pretrained=str(tiny_model), device="cpu", batch_size=8).loglikelihood(requests_, disable_tqdm=True)
    assert np.allclose([o[0] for o in ours], [t[0] for t in theirs], atol=1e-5, rtol=0)
    assert [o[1] for o in ours] == [t[1] for t in theirs]


def test_loglikelihood_is_the_models_own(tiny_model, requests_):
    """Each request's value is log P(continuation | context) from LM.logits, tokenized as lm-eval's HFLM does."""
    lm = _lm(tiny_model)
    h = zeroshot.HarnessLM(lm)
    got = _lls(lm, requests_)
    for req, value in list(zip(requests_, got))[::7]:
        ctx, cont = req.args
        n_sp = len(ctx) - len(ctx.rstrip())  # HFLM moves the context's trailing spaces to the continuation
        ctx, cont = ctx[: len(ctx) - n_sp], ctx[len(ctx) - n_sp:] + cont
        whole, c = h.tok_encode(ctx + cont), h.tok_encode(ctx)
        with torch.no_grad():
            logp = torch.log_softmax(lm.logits(torch.tensor([whole[:-1]]))[0], -1)
        ref = sum(logp[i - 1, whole[i]].item() for i in range(len(c), len(whole)))
        assert value == pytest.approx(ref, abs=1e-4)


def test_harness_sees_the_peft_parts(tiny_model, requests_):
    base = _lls(_lm(tiny_model), requests_)
    # LoRA B = 0 and adapters' up = 0 (their init): the node is its base, to the last bit
    assert np.array_equal(_lls(_lm(tiny_model, ["lora", "adapter"]), requests_), base)
    # trained-like LoRA + adapters, or a soft prompt (never an identity): other loglikelihoods on every request
    for methods in (["lora", "adapter"], ["prompt"], ["lora", "adapter", "prompt"]):
        diff = np.abs(_lls(_lm(tiny_model, methods, randomize=True), requests_) - base)
        assert diff.min() > 1e-5, methods


def test_nf4_base_scores_through_its_kernels_with_peft_parts(tiny_model, requests_):
    fp = _lls(_lm(tiny_model), requests_)
    nf4 = _lls(_lm(tiny_model, nf4=True), requests_)
    assert np.abs(nf4 - fp).max() > 1e-3  # the 4-bit weights, not a silent fp copy
    assert np.array_equal(_lls(_lm(tiny_model, ["lora", "adapter"], nf4=True), requests_), nf4)  # zero-init parts
    qlora = _lls(_lm(tiny_model, ["lora", "adapter", "prompt"], randomize=True, nf4=True), requests_)
    assert np.isfinite(qlora).all() and np.abs(qlora - nf4).min() > 1e-5


def test_evaluate_zeroshot_returns_per_item_results(tiny_model):
    base = zeroshot.evaluate_zeroshot(_lm(tiny_model), LIMITS, batch_size=4)
    assert list(base) == list(LIMITS)
    for name, r in base.items():
        assert r["n"] == LIMITS[name] == len(r["items"]) == len(r["doc_ids"]) and r["size"] == local.SIZES[name]
        assert r["metric"] == "acc" and set(r["items"]) <= {0, 1} and r["acc"] == pytest.approx(np.mean(r["items"]))
        assert r["doc_ids"] == local.sample_ids(name, r["size"], LIMITS[name], 0)
        assert ("items_norm" in r) == ("acc_norm" in r) == (name == "arc_easy")
    assert base["arc_easy"]["acc_norm"] == pytest.approx(np.mean(base["arc_easy"]["items_norm"]))
    for name in ("arc_easy", "winogrande", "boolq"):  # acc is argmax of the logged choice log-likelihoods == gold
        r = base[name]
        assert [int(np.argmax(ll) == g) for ll, g in zip(r["lls"], r["gold"])] == r["items"]
    assert [len(ll) for ll in base["lambada_openai"]["lls"]] == [1] * 3 and "gold" not in base["lambada_openai"]
    assert base["lambada_openai"]["perplexity"] > 1
    zeroed = zeroshot.evaluate_zeroshot(_lm(tiny_model, ["lora", "adapter"]), LIMITS, batch_size=4)
    strip = lambda res: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in res.items()}  # noqa: E731
    assert strip(zeroed) == strip(base)
    prompted = zeroshot.evaluate_zeroshot(_lm(tiny_model, ["prompt"], randomize=True), {"arc_easy": 6})
    assert prompted["arc_easy"]["doc_ids"] == base["arc_easy"]["doc_ids"]  # same items on every node


def test_loglikelihood_rolling_sums_every_token(tiny_model):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows

    lm = _lm(tiny_model, ["prompt"], randomize=True)
    h = zeroshot.HarnessLM(lm)
    h.max_length = 40  # several windows
    text = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[:400]
    got = h.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    toks = h.tok_encode(text)
    ref, n_pred = 0.0, 0
    with torch.no_grad():  # lm-eval's windows (input, tokens to predict), scored straight from LM.logits
        for inp, pred in get_rolling_token_windows(toks, h.prefix_token_id, 40, 1):
            logp = torch.log_softmax(lm.logits(torch.tensor([inp]))[0], -1)[-len(pred):]
            ref += logp.gather(-1, torch.tensor(pred)[:, None]).sum().item()
            n_pred += len(pred)
    assert n_pred == len(toks) > 80
    assert got == pytest.approx(ref, abs=1e-3)


def test_encodings_are_shared_across_nodes_with_equal_tokenizers_only(tiny_model, monkeypatch, requests_):
    """A process evaluating several nodes encodes each context / continuation once per tokenizer definition: a second
    node's harness (its own tokenizer object, loaded from its own artifact) encodes nothing again and gets the same ids
    and scores; a tokenizer that encodes differently gets its own entries."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(zeroshot, "_ENCODED", {})
    lm = _lm(tiny_model)
    first = zeroshot.HarnessLM(lm).loglikelihood(requests_, disable_tqdm=True)
    cached = len(zeroshot._ENCODED)
    assert cached > 0
    lm.tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # another node: an equal tokenizer, a new object
    calls = []
    real = type(lm.tokenizer).encode
    monkeypatch.setattr(type(lm.tokenizer), "encode", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    h = zeroshot.HarnessLM(lm)
    assert h.loglikelihood(requests_, disable_tqdm=True) == first and calls == []
    text = requests_[0].args[0]
    assert h.tok_encode(text) == real(lm.tokenizer, text)  # what it would encode, as a list the caller may change
    h.tok_encode(text).append(-1)
    assert h.tok_encode(text) == real(lm.tokenizer, text)
    other = AutoTokenizer.from_pretrained(tiny_model)
    other.backend_tokenizer.add_tokens([text.split()[0] + "zz"])  # a different definition: never served these ids
    assert zeroshot._tokenizer_key(other) != h._tokenizer_key
