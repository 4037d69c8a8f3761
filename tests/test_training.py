"""Training that means something: the lr schedule, gradient accumulation, packing by documents, the Alpaca
template's response-only loss, the held-out curve, and the fused linear + cross-entropy loss (tiny model, CPU)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import DATA, ROOT, tiny_params, write_data
from pipeline import data
from pipeline.config import DomainCfg, PeftCfg, parse_params, ConfigError
from pipeline.models import LM, fused_linear_cross_entropy, load_source
from pipeline.config import ModelCfg

ALPACA = DATA / "alpaca-5000" / "alpaca_5000.json"


def peft_cfg(**kw) -> PeftCfg:
    return PeftCfg(kind="peft", **({"methods": ["lora"]} | kw))


def tiny_lm(tiny_model, methods=("lora", "adapter", "prompt"), tied: bool = False, **kw):
    """The tiny model as an LM with PEFT parts whose zero-initialised halves are perturbed, so every part matters."""
    from pipeline.stages.peft import add_peft

    model, tok = load_source(ModelCfg(source=str(tiny_model), device="cpu"), torch.device("cpu"))
    if tied:
        from transformers import LlamaForCausalLM

        torch.manual_seed(1)
        model = LlamaForCausalLM(type(model.config).from_dict({**model.config.to_dict(), "tie_word_embeddings": True})).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    lm = LM(model, tok, None, torch.device("cpu"))
    trainable = add_peft(lm, peft_cfg(methods=list(methods), adapter_dim=16, prompt_tokens=4, **kw), seed=0)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.02)  # LoRA B and the adapters' up start at zero: no gradient to compare
    return lm, trainable


def text_docs(n: int = 12) -> list[str]:
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    return [b for b in text.split("\n\n") if b.strip()][:n]


# ---------------------------------------------------------------- schedule
def test_schedule_warms_up_then_decays_by_cosine_to_about_zero():
    from pipeline.stages.peft import lr_factor

    f = lr_factor(peft_cfg(steps=100, warmup_steps=10))
    lrs = [f(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warm-up
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) in (9, 10)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing after it
    assert lrs[55] == pytest.approx(0.5, abs=0.01)  # the cosine's midpoint
    assert lrs[-1] < 0.005
    assert lr_factor(peft_cfg(steps=100, warmup_fraction=0.2))(19) == pytest.approx(1.0)  # the fraction form
    assert lr_factor(peft_cfg(steps=100, schedule="constant"))(90) == 1.0


def test_bad_schedule_params_fail_naming_the_field(tmp_path):
    raw = tiny_params(tmp_path)
    raw["stages"]["lora_only"].update(steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="warmup_steps"):
        parse_params(raw)
    raw["stages"]["lora_only"].update(warmup_steps=None, early_stop_patience=2, eval_every=0)
    with pytest.raises(ConfigError, match="eval_every"):
        parse_params(raw)


# ---------------------------------------------------------------- packing
def test_document_packing_never_crosses_a_document_and_masks_padding(tiny_model):
    _, tok = load_source(ModelCfg(source=str(tiny_model), device="cpu"), torch.device("cpu"))
    docs = text_docs()
    seqs = data.document_sequences(tok, docs, seq_len=32)
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert len(seqs) > len(docs)  # long documents are cut into several sequences
    pieces_per_doc = [0] * len(docs)
    for ids, labels, mask in zip(seqs.ids.tolist(), seqs.labels.tolist(), seqs.attention_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (32 - n)  # right padding only
        real = ids[:n]
        owners = [i for i, d in enumerate(doc_ids) if any(d[s: s + n] == real for s in range(0, len(d), 32))]
        assert len(owners) == 1, "a sequence must be one piece of exactly one document"
        pieces_per_doc[owners[0]] += 1
        assert labels[:n] == real and labels[n:] == [data.IGNORE] * (32 - n)  # padding is never a target
    assert pieces_per_doc == [-(-len(d) // 32) - (len(d) % 32 == 1) for d in doc_ids]  # every piece, in order
    # the blank-line blocks of a text file are its documents; plain text defaults to one stream
    stream = DomainCfg(files="x.txt")
    assert not stream.by_documents and DomainCfg(files="x.jsonl", format="json").by_documents
    assert DomainCfg(files="x.txt", packing="documents").by_documents


def test_text_file_documents_are_blank_line_blocks(tmp_path):
    (tmp_path / "d.txt").write_text("one a\none b\n\n\ntwo\n \nthree\n")
    domain = DomainCfg(files=str(tmp_path / "d.txt"), packing="documents", heldout_fraction=0.34)
    assert data.documents(domain) == ["one a\none b", "two", "three\n"]
    assert data.split_documents(domain) == (["one a\none b", "two"], ["three\n"])


def test_padded_batch_loss_equals_the_unpadded_sequences(tiny_model):
    """Padding changes nothing: the loss of a padded batch is the token-weighted mean of its rows alone."""
    lm, _ = tiny_lm(tiny_model)
    seqs = data.document_sequences(lm.tokenizer, text_docs(6), seq_len=48)
    short = [i for i in range(len(seqs)) if seqs.attention_mask[i].sum() < 48][:2] + [0]
    batch = seqs[torch.tensor(short)]
    assert not bool(batch.attention_mask.all())
    with torch.no_grad():
        alone = [lm.loss(data.Batch.of(b.ids[:, : b.n_tokens])) for b in (batch[i: i + 1] for i in range(len(short)))]
        counts = [batch[i: i + 1].n_targets for i in range(len(short))]
        expect = sum(l * n for l, n in zip(alone, counts)) / sum(counts)
        assert lm.loss(batch).item() == pytest.approx(expect.item(), rel=1e-5)
        assert lm.loss(batch, fused=True).item() == pytest.approx(expect.item(), rel=1e-5)


# ---------------------------------------------------------------- Alpaca
def alpaca_domain(tmp_path, n: int = 40) -> DomainCfg:
    records = json.loads(ALPACA.read_text())[:n]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return DomainCfg(files=str(path), format="json", template="alpaca")


def test_alpaca_template_and_loss_on_the_response_only(tiny_model, tmp_path):
    domain = alpaca_domain(tmp_path)
    records = json.loads(ALPACA.read_text())[:40]
    prompts = data.examples(domain)
    with_input = next(i for i, r in enumerate(records) if r["input"].strip())
    without = next(i for i, r in enumerate(records) if not r["input"].strip())
    assert "### Input:\n" + records[with_input]["input"] in prompts[with_input][0]
    assert "### Input:" not in prompts[without][0] and prompts[without][0].endswith("### Response:\n")
    assert prompts[without][1] == records[without]["output"]

    lm, _ = tiny_lm(tiny_model, methods=("lora",))
    tok = lm.tokenizer
    seqs = data.document_sequences(tok, list(prompts[:8]), seq_len=512)
    complete = 0
    for i, (p, r) in enumerate(prompts[:8]):
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        labels = seqs.labels[i]
        assert (labels[:n_prompt] == data.IGNORE).all()  # no loss on the instruction
        targets = labels[labels != data.IGNORE].tolist()
        if seqs.attention_mask[i].sum() < 512:
            assert tok.decode(targets[:-1]) == r and targets[-1] == tok.eos_token_id  # the response, then EOS
            complete += 1
        else:  # truncated to seq_len: a prefix of the response
            assert r.startswith(tok.decode(targets)) and len(targets) == 512 - n_prompt
    assert complete >= 4

    # the loss counts response tokens only: equal to a hand-computed CE over them
    batch = seqs[:4].trimmed()
    with torch.no_grad():
        logits = lm.logits(batch.ids).float()
        tgt = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=data.IGNORE)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=data.IGNORE)
        assert lm.loss(batch).item() == pytest.approx(ce.item(), rel=1e-5)
        prompt_only = data.Batch(batch.ids, torch.where(batch.labels == data.IGNORE, batch.ids, data.IGNORE),
                                 batch.attention_mask)
        assert lm.loss(prompt_only).item() != pytest.approx(ce.item(), rel=1e-3)  # it would differ if prompts counted


def test_alpaca_params_file_validates_plans_and_passes_the_checks(monkeypatch):
    from pipeline.checks import check
    from pipeline.config import load_params
    from pipeline.plan import build_plan

    path = ROOT / "experiments" / "alpaca" / "params.yaml"
    params = load_params(path)
    assert params.data.domain.template == "alpaca" and params.data.domain.by_documents
    monkeypatch.chdir(path.parent)  # as the CLI does: its paths are relative to its directory
    check(params, build_plan(params))
    assert len(data.split_documents(params.data.domain)[1]) == 500
    raw = yaml.safe_load(path.read_text())
    raw["data"]["domain"]["format"] = "text"
    with pytest.raises(ConfigError, match="format: json"):
        parse_params(raw)


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("fused", [False, True])
def test_accumulating_micro_batches_gives_the_big_batch_gradient(tiny_model, fused):
    lm, trainable = tiny_lm(tiny_model)
    seqs = data.document_sequences(lm.tokenizer, text_docs(8), seq_len=40)
    big = seqs[:6]
    assert len({big[i: i + 2].n_targets for i in range(0, 6, 2)}) > 1  # unequal targets: a plain mean of means fails

    lm.loss(big, fused=fused).backward()
    ref = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    n = big.n_targets
    for i in range(0, 6, 2):
        lm.loss(big[i: i + 2].trimmed(), num_items=n, fused=fused).backward()
    for p, g in zip(trainable, ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- fused loss
def test_chunked_fused_cross_entropy_matches_logits_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_elements=97 * 7)  # 8 chunks of 7 rows
    fused.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("methods,tied", [(("lora", "adapter", "prompt"), False), (("lora", "prompt"), True),
                                          (("adapter",), False), (("prompt",), True),
                                          (("lora", "prefix", "prompt"), False)])  # the prefix cache + padding mask
def test_fused_loss_equals_the_hf_loss_and_its_gradients(tiny_model, methods, tied):
    lm, trainable = tiny_lm(tiny_model, methods, tied=tied)
    assert lm.loss_impl(True) == "chunked" and lm.loss_impl(False) == "hf"
    seqs = data.document_sequences(lm.tokenizer, text_docs(6), seq_len=40)
    batch = seqs[torch.tensor([0, 1, len(seqs) - 1])].trimmed()  # a padded row among them
    grads = {}
    for fused in (False, True):
        loss = lm.loss(batch, fused=fused)
        loss.backward()
        grads[fused] = (loss.item(), [p.grad.clone() for p in trainable])
        for p in trainable:
            p.grad = None
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-5)
    for g_fused, g_plain in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the curve and early stop
def test_training_records_the_heldout_curve_and_stops_on_a_plateau(tiny_model):
    from pipeline.stages.peft import train

    domain = DomainCfg(files=str(DATA / "tinyshakespeare" / "input.txt"))
    lm, trainable = tiny_lm(tiny_model, methods=("lora",))
    cfg = peft_cfg(steps=6, eval_every=2, seq_len=32, batch_size=2, grad_accum=2, lr=5e-3, eval_sequences=4)
    source = data.tokenize(lm.tokenizer, data.domain_split(domain)[0][:50_000])
    heldout = data.heldout_sample(lm.tokenizer, domain, 32, 4)
    assert len(heldout) == 4
    info = train(lm, trainable, cfg, source, seed=0, heldout=heldout)
    curve = info["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 6] and curve[0]["train_loss"] is None
    assert all(p["heldout_loss"] > 0 for p in curve) and all(p["train_loss"] > 0 for p in curve[1:])
    assert curve[-1]["heldout_loss"] < curve[0]["heldout_loss"]  # it learns the domain (lr 5e-3 on a random model)
    assert curve[-1]["lr"] < curve[1]["lr"]  # the cosine decays
    assert info["steps"] == 6 and info["loss_impl"] == "chunked" and "stopped_early_at" not in info

    lm, trainable = tiny_lm(tiny_model, methods=("lora",))
    stop = cfg.model_copy(update={"early_stop_patience": 1, "early_stop_min_delta": 100.0})  # nothing improves by 100
    info = train(lm, trainable, stop, source, seed=0, heldout=heldout)
    assert info["stopped_early_at"] == 2 and info["steps"] == 2 and len(info["curve"]) == 2


@pytest.mark.integration
def test_peft_node_records_its_curve_and_the_report_draws_it(tmp_path, tiny_model, monkeypatch):
    """A PEFT node over an Alpaca domain end to end: the curve in artifact info and metrics, a response-only
    held-out perplexity, and reports/train_curves.png."""
    from pipeline import report
    from pipeline.config import load_params
    from pipeline.runner import run_node

    write_data(tmp_path)
    alpaca_domain(tmp_path / "data", n=60)
    raw = tiny_params(tiny_model)
    raw["data"]["domain"] = {"files": "data/alpaca.json", "format": "json", "template": "alpaca", "heldout_fraction": 0.2}
    raw["stages"]["lora_only"].update(steps=4, eval_every=2, eval_sequences=4, seq_len=256)  # the prompt: ~100 tokens
    raw["evaluate"].update(seq_len=256, max_tokens=100_000)  # every held-out example
    raw["orderings"] = {"lora_only": ["lora_only"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    run_node("base", params)
    metrics = run_node("lora_only", params)
    assert [p["step"] for p in metrics["train"]["curve"]] == [0, 2, 4]
    # one NLL per held-out example (12 of 60), not per window: the responses only
    assert len(metrics["nll_per_window"]["domain_heldout"]) == 12
    assert "response tokens" in metrics["eval"]["conventions"]["domain_heldout"]
    report.run(params)
    assert (tmp_path / "reports" / "train_curves.png").stat().st_size > 10_000
    assert "train_curves.png" in (tmp_path / "reports" / "compare.md").read_text()


@pytest.mark.integration
def test_the_heldout_curve_keeps_training_over_a_gptq_base(tmp_path, tiny_model):
    """gptqmodel's CPU kernel turns a layer into a no-grad int4 path on its first eval-mode, no-grad forward: the
    curve's held-out loss before step 1 must not do that, or LoRA over GPTQ stops getting gradients."""
    from conftest import run_project

    p = tiny_params(tiny_model)
    p["stages"]["gptq_base"] = {"kind": "quantize", "method": "gptq", "group_size": 128}
    p["stages"]["lora_fast"] = {"kind": "peft", "methods": ["lora"], "steps": 6, "seq_len": 64, "lr": 0.01,
                                "eval_every": 2}
    p["orderings"] = {"gptq_then_lora": ["gptq_base", "lora_fast"]}
    _, results = run_project(tmp_path, p)
    train = results["gptq_base-lora_fast"]["train"]
    assert [c["step"] for c in train["curve"]] == [0, 2, 4, 6]
    assert train["curve"][-1]["heldout_loss"] < train["curve"][0]["heldout_loss"]


def test_cuda_graph_names_why_it_is_off_and_cannot_combine_with_compile(tiny_model):
    """On CPU (and for shapes or hooks a graph cannot replay) training runs eagerly and says why; the eager run is the
    same run as without the option."""
    from pipeline.stages.peft import graph_blocker, train

    domain = DomainCfg(files=str(DATA / "tinyshakespeare" / "input.txt"))
    cfg = peft_cfg(steps=3, seq_len=32, batch_size=2, lr=5e-3, eval_every=0)
    runs = {}
    for graph in (False, True):
        lm, trainable = tiny_lm(tiny_model, methods=("lora", "adapter"))
        source = data.tokenize(lm.tokenizer, data.domain_split(domain)[0][:20_000])
        runs[graph] = train(lm, trainable, cfg.model_copy(update={"cuda_graph": graph}), source, seed=0)
    assert runs[False]["cuda_graph"] == "off: cuda_graph: false"
    assert runs[True]["cuda_graph"] == "off: not on CUDA"
    assert runs[True]["loss_first"] == runs[False]["loss_first"] and runs[True]["loss_last"] == runs[False]["loss_last"]

    class FakeCuda:  # graph_blocker's other reasons, as if on a GPU
        device = torch.device("cuda")
    docs = data.Batch.of(torch.zeros(2, 8, dtype=torch.long))
    assert "document" in graph_blocker(FakeCuda, cfg, docs, None)
    assert "grad_accum" in graph_blocker(FakeCuda, cfg.model_copy(update={"grad_accum": 2}), source, None)
    assert "prune_during" in graph_blocker(FakeCuda, cfg, source, lambda step: None)
    assert graph_blocker(FakeCuda, cfg, source, None) is None
    with pytest.raises(ValueError, match="cuda_graph and compile"):
        peft_cfg(cuda_graph=True, compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/train_graph.py measured it)")
def test_cuda_graph_step_matches_eager(tiny_model):
    """On a GPU: the recorded-and-replayed step trains as the eager one does (same losses within float noise)."""
    from pipeline.stages.peft import train

    domain = DomainCfg(files=str(DATA / "tinyshakespeare" / "input.txt"))
    cfg = peft_cfg(steps=12, seq_len=32, batch_size=2, lr=5e-3, eval_every=4, fused_loss="off")
    runs = {}
    for graph in (False, True):
        lm, trainable = tiny_lm(tiny_model, methods=("lora", "adapter", "prompt"))
        lm.model.cuda()
        lm.hybrid.cuda()
        lm.device = torch.device("cuda")
        source = data.tokenize(lm.tokenizer, data.domain_split(domain)[0][:20_000])
        heldout = data.heldout_sample(lm.tokenizer, domain, 32, 4)
        runs[graph] = train(lm, trainable, cfg.model_copy(update={"cuda_graph": graph}), source, seed=0, heldout=heldout)
    assert runs[True]["cuda_graph"] == "on"
    for a, b in zip(runs[False]["curve"], runs[True]["curve"]):
        assert abs(a["heldout_loss"] - b["heldout_loss"]) < 1e-3
