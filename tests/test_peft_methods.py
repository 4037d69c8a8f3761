"""Prefix tuning (the fourth PEFT method) and pruning during PEFT, on the tiny random Llama (GQA: 4 heads, 2 KV heads)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, run_project, tiny_params
from pipeline import artifact
from pipeline.adapters import WEIGHTS, Hybrid
from pipeline.config import ConfigError, ModelCfg, PeftCfg, parse_params
from pipeline.models import LM, load_base
from pipeline.plan import HARMA, PlanError, build_plan
from pipeline.runner import artifact_path
from pipeline.stages.peft import add_peft, real_token_kv, train
from pipeline.stages.prune import block_linears
from test_config import default_raw

CPU = torch.device("cpu")


def fresh_lm(model_dir) -> LM:
    model, tok = load_base(model_dir, "hf", ModelCfg(source=str(model_dir), device="cpu"), CPU)
    return LM(model, tok, None, CPU)


def peft_cfg(methods: list[str], **kw) -> PeftCfg:
    return PeftCfg(kind="peft", methods=methods, **kw)


def tokens(lm: LM, n: int, offset: int = 0) -> torch.Tensor:
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[offset: offset + 20 * n]
    return lm.tokenizer(text, return_tensors="pt").input_ids[0, :n]


@torch.no_grad()
def perturb(lm: LM, seed: int = 1) -> None:
    """Give every PEFT part a visible effect (LoRA B and the adapters' `up` start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(lm.model.named_parameters()) + list(lm.hybrid.named_parameters()):
        if "lora_B" in name or ".up." in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def test_prefix_of_real_token_kv_equals_reading_those_tokens(tiny_model):
    """A prefix set to the base's own K/V of tokens t makes the model on x equal the base on t + x: the prefix layout
    (layers x key/value x KV heads under GQA) and the positions (x after the prefix) are right."""
    lm = fresh_lm(tiny_model)
    assert lm.base.config.num_key_value_heads < lm.base.config.num_attention_heads
    t, x = tokens(lm, 6), tokens(lm, 24, offset=5000)
    base_on_x = lm.logits(x[None])
    add_peft(lm, peft_cfg(["prefix"], prefix_tokens=6), seed=0)
    assert lm.hybrid.prefix.kv.shape == (2, 2, 2, 6, 32)  # [layers, k/v, kv_heads, tokens, head_dim]
    lm.hybrid.prefix.kv.copy_(real_token_kv(lm, t))
    with_prefix = lm.logits(x[None])
    reference = lm.base(input_ids=torch.cat([t, x])[None]).logits[:, 6:]
    torch.testing.assert_close(with_prefix, reference, atol=1e-4, rtol=1e-4)
    assert (with_prefix - base_on_x).abs().max() > 0.1  # the prefix changes the logits


@torch.no_grad()
def test_kv_cache_path_equals_full_forward(tiny_model):
    """Prefill + token-by-token decode (what the latency measurement runs) gives the full forward's logits, with the
    prefix, the soft prompt, LoRA and the adapters all present, for a batch of two."""
    lm = fresh_lm(tiny_model)
    add_peft(lm, peft_cfg(["lora", "adapter", "prompt", "prefix"], prefix_tokens=5, prompt_tokens=3, adapter_dim=16),
             seed=0)
    perturb(lm)
    lm.model.eval()
    ids = torch.stack([tokens(lm, 20), tokens(lm, 20, offset=9000)])
    full = lm.logits(ids)
    logits, past = lm.prefill(ids[:, :8])
    steps = [logits]
    for i in range(8, ids.shape[1]):
        logits, past = lm.decode(ids[:, i: i + 1], past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert past.get_seq_length() == 5 + 3 + 20  # prefix + soft prompt + tokens


@torch.no_grad()
def test_prefix_mlp_folds_on_save_and_reloads_identically(tiny_model, tmp_path):
    lm = fresh_lm(tiny_model)
    x = tokens(lm, 32)[None]
    base_logits = lm.logits(x)
    add_peft(lm, peft_cfg(["prefix", "adapter"], prefix_tokens=4, prefix_mlp=True, prefix_mlp_dim=64, adapter_dim=8),
             seed=0)
    assert lm.hybrid.prefix.kv is None and lm.hybrid.prefix.mlp is not None
    perturb(lm)
    trained = lm.logits(x)
    assert (trained - base_logits).abs().max() > 0.1
    lm.hybrid.save(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert saved["prefix.kv"].shape == (2, 2, 2, 4, 32) and not any("mlp" in k or "embedding" in k for k in saved)
    again = fresh_lm(tiny_model)
    again.hybrid = Hybrid.load(tmp_path)
    again.hybrid.attach(again.model)
    assert again.hybrid.methods == ["adapter", "prefix"] and again.hybrid.prefix.kv is not None  # plain, folded
    torch.testing.assert_close(again.logits(x), trained, atol=1e-5, rtol=1e-5)


def test_zero_shot_sees_the_prefix_batched_or_not(tiny_model):
    """lm-eval drives LM.logits on right-padded batches: with a prefix, batching changes no score, and the scores are
    not the base model's."""
    from pipeline.zeroshot import evaluate_zeroshot

    tasks = {"arc_easy": 4, "boolq": 4}
    lm = fresh_lm(tiny_model)
    base = evaluate_zeroshot(lm, tasks, batch_size=4)
    add_peft(lm, peft_cfg(["prefix"], prefix_tokens=4), seed=0)
    with torch.no_grad():
        lm.hybrid.prefix.kv.mul_(20)  # a strong prefix: the real-token init is close to the base's own attention
    batched, single = evaluate_zeroshot(lm, tasks, batch_size=4), evaluate_zeroshot(lm, tasks, batch_size=1)
    flat = lambda res, name: [x for item in res[name]["lls"] for x in item]  # noqa: E731
    for name in tasks:
        assert flat(batched, name) == pytest.approx(flat(single, name), abs=1e-4)
        assert min(abs(a - b) for a, b in zip(flat(batched, name), flat(base, name))) > 1e-3


def test_prefix_lora_adapter_prompt_train_together(tiny_model):
    lm = fresh_lm(tiny_model)
    cfg = peft_cfg(["lora", "adapter", "prompt", "prefix"], steps=24, seq_len=64, batch_size=2, lr=5e-3,
                   adapter_dim=16, prompt_tokens=4, prefix_tokens=4, prefix_mlp=True, prefix_mlp_dim=64)
    trainable = add_peft(lm, cfg, seed=0)
    before = {id(p): p.detach().clone() for p in trainable}
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:100_000]
    stats = train(lm, trainable, cfg, lm.tokenizer(text, return_tensors="pt").input_ids[0], seed=0)
    assert stats["loss_last"] < stats["loss_first"] - 0.1, stats
    moved = {n for n, p in list(lm.model.named_parameters()) + [(f"hybrid.{k}", v) for k, v in lm.hybrid.named_parameters()]
             if id(p) in before and not torch.equal(p, before[id(p)])}
    for part in ("lora_A", "lora_B", "adapters", "prompt", "prefix.mlp", "prefix.embedding"):
        assert any(part in n for n in moved), f"{part} did not train"


@torch.no_grad()
def test_prune_during_scores_the_effective_weight_and_masks_only_grow(tiny_model):
    """q_proj's base weights are tiny on the first half of the inputs, where LoRA adds a large delta: pruning |W + BA|
    keeps that half (pruning |W| alone would drop it). A second, higher target keeps every earlier zero."""
    from pipeline.config import PruneDuringCfg
    from pipeline.stages.peft import PruneDuring

    lm = fresh_lm(tiny_model)
    add_peft(lm, peft_cfg(["lora"], lora_targets=["q_proj"]), seed=0)
    q = lm.model.base_model.model.model.layers[0].self_attn.q_proj
    half = q.in_features // 2
    q.base_layer.weight[:, :half] *= 1e-4
    q.lora_A["default"].weight.zero_()[:, :half] = 1.0
    q.lora_B["default"].weight.fill_(1.0)  # delta = scaling x r on the first half of every row, 0 on the rest
    pruner = PruneDuring(lm, PruneDuringCfg(method="magnitude", sparsity=0.5, start=0.0, end=0.5, every=1), steps=4)
    pruner(2)  # s(2) = 0.5 at t1: the whole target at once
    w = q.base_layer.weight
    assert (w[:, :half] != 0).all() and (w[:, half:] == 0).all()
    zeros = {n: lin.weight == 0 for n, lin in block_linears(lm.model).items()}
    pruner.cfg = PruneDuringCfg(method="magnitude", sparsity=0.75, start=0.0, end=0.5, every=1)
    pruner(2)
    for n, lin in block_linears(lm.model).items():
        assert (lin.weight[zeros[n]] == 0).all(), n
        assert (lin.weight == 0).float().mean().item() == pytest.approx(0.75, abs=0.01), n
    assert [e["target"] for e in pruner.close()["schedule"]] == [0.5, 0.75]


# ---------------------------------------------------------------- plan / config
def _plan(orderings: dict, stages: dict):
    raw = copy.deepcopy(default_raw())
    raw["stages"].update(stages)
    raw["orderings"] = orderings
    return build_plan(parse_params(raw))


PDP = {"kind": "peft", "methods": ["lora", "adapter"], "prune_during": {"method": "wanda", "sparsity": 0.5}}


def test_prune_during_makes_the_state_sparse():
    plan = _plan({"pdp": ["pdp", "merge"], "prefix": ["prefix_only", "merge"]},
                 {"pdp": PDP, "prefix_only": {"kind": "peft", "methods": ["prefix"]}})
    assert plan.nodes["pdp"].state.sparse and plan.nodes["pdp"].state.describe() == "fp sparse +lora+adapter"
    assert plan.nodes["pdp-merge"].state.sparse
    assert plan.nodes["prefix_only-merge"].state.modules == ("prefix",)


@pytest.mark.parametrize("chain, position, quant", [(["nf4", "pdp"], 2, "nf4"), (["gptq_base", "pdp"], 2, "gptq"),
                                                     (["wanda50", "nf4", "pdp"], 3, "nf4")])
def test_prune_during_over_a_quantized_base_fails_at_plan_time(chain, position, quant):
    stages = {"pdp": PDP, "gptq_base": {"kind": "quantize", "method": "gptq"}}
    with pytest.raises(PlanError) as exc:
        _plan({"bad": chain}, stages)
    msg = str(exc.value)
    assert "\n" not in msg and f"ordering 'bad', position {position} ({chain[position - 1]}, peft)" in msg
    assert f"prune_during cannot prune a {quant} base; prune before quantizing" in msg


def test_prune_during_after_a_dequantizing_merge_is_allowed_but_flagged():
    plan = _plan({"q_then_p": ["nf4", "lora_only", "merge", "pdp"]}, {"pdp": PDP})
    node = plan.nodes["nf4-lora_only-merge-pdp"]
    assert node.state.sparse and node.flags == [HARMA]


@pytest.mark.parametrize("change, field", [
    ({"prune_during": {"sparsity": 0.5, "start": 0.7, "end": 0.2}}, "stages.pdp.prune_during"),
    ({"prune_during": {"sparsity": 1.0}}, "stages.pdp.prune_during.sparsity"),
    ({"prune_during": {"method": "sparsegpt"}}, "stages.pdp.prune_during.method"),
    ({"seeds": [0, 1]}, "stages.pdp"),
    ({"methods": ["prefix", "prefix"]}, "stages.pdp.methods"),
])
def test_bad_prune_during_or_prefix_params_name_the_field(change, field):
    raw = copy.deepcopy(default_raw())
    raw["stages"]["pdp"] = {**PDP, **change}
    raw["orderings"] = {"x": ["pdp"]}
    with pytest.raises(ConfigError) as exc:
        parse_params(raw)
    assert f"{field}" in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------- through the runner (~6 s: six tiny nodes)
def test_nodes_prefix_through_merge_and_ptq_and_prune_during_peft(tmp_path, tiny_model):
    params = tiny_params(tiny_model, steps=20)
    params["stages"].update({
        "hy4": {"kind": "peft", "methods": ["lora", "adapter", "prompt", "prefix"], "steps": 12, "seq_len": 64,
                "adapter_dim": 16, "prompt_tokens": 4, "prefix_tokens": 4, "prefix_mlp": True, "prefix_mlp_dim": 64,
                "lr": 0.005},
        "nf4_ptq": {"kind": "ptq", "method": "nf4"},
        "pdp": {"kind": "peft", "methods": ["lora", "adapter"], "steps": 20, "seq_len": 64, "adapter_dim": 16,
                "lr": 0.005, "prune_during": {"method": "wanda", "sparsity": 0.5, "start": 0.1, "end": 0.7, "every": 4}},
    })
    params["orderings"] = {"prefix_all": ["hy4", "merge", "nf4_ptq"], "pdp": ["pdp", "merge"]}
    _, r = run_project(tmp_path, params)

    # prefix: trained with an MLP, saved folded, kept by merge and ptq, evaluated (ppl, latency) on every node
    kv = {n: load_file(tmp_path / "artifacts" / n / "peft" / WEIGHTS)["prefix.kv"] for n in ("hy4", "hy4-merge", "hy4-merge-nf4_ptq")}
    assert kv["hy4"].shape == (2, 2, 2, 4, 32)
    assert torch.equal(kv["hy4"], kv["hy4-merge"]) and torch.equal(kv["hy4"], kv["hy4-merge-nf4_ptq"])
    assert r["hy4"]["train"]["loss_last"] < r["hy4"]["train"]["loss_first"]
    assert r["hy4-merge"]["merge_error"]["max_abs_logit_diff"] < 1e-3
    assert r["hy4-merge"]["ppl"]["domain_heldout"] == pytest.approx(r["hy4"]["ppl"]["domain_heldout"], rel=1e-3)
    assert r["hy4-merge-nf4_ptq"]["ppl"]["domain_heldout"] == pytest.approx(r["hy4"]["ppl"]["domain_heldout"], rel=0.1)
    assert r["hy4"]["params"]["peft"] > r["hy4-merge"]["params"]["peft"] > 0  # LoRA folded; prefix/adapter/prompt kept
    assert all(r[n]["latency"]["decode_tok_s"] > 0 for n in kv)

    # prune during PEFT: the node holds its own sparse base at the target; merge keeps the mask
    pdp = tmp_path / "artifacts" / "pdp"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert artifact.weights_dir(artifact_path("pdp")) == pdp.resolve()
    schedule = r["pdp"]["prune"]["schedule"]
    # 20 steps: t0 = 2, t1 = 14, every 4; s(2) = 0 is skipped; cubic: s(6) = 0.5 (1 - (2/3)^3)
    assert [s["step"] for s in schedule] == [6, 10, 14] and schedule[-1]["target"] == 0.5
    assert schedule[0]["target"] == pytest.approx(0.5 * (1 - (2 / 3) ** 3), abs=1e-4)
    assert all(a["measured"] <= b["measured"] for a, b in zip(schedule, schedule[1:]))  # masks only grow
    saved = {k: v for k, v in load_file(pdp / "model.safetensors").items() if ".layers." in k and k.endswith("proj.weight")}
    assert not any("lora" in k or "base_layer" in k for k in load_file(pdp / "model.safetensors"))
    assert len(saved) == 2 * 7
    for name, w in saved.items():
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
    merged = load_file(tmp_path / "artifacts" / "pdp-merge" / "model.safetensors")
    for name, w in saved.items():
        assert torch.equal(merged[name] == 0, w == 0), f"{name}: merge lost the mask"
    parent = load_file(tmp_path / "artifacts" / "base" / "model.safetensors")
    q = next(k for k in saved if "q_proj" in k)
    assert not torch.equal(merged[q], parent[q] * (saved[q] != 0))  # the LoRA delta was folded in, inside the mask
    assert r["pdp"]["params"]["sparsity"] > 0.3 and r["pdp"]["state"] == "fp sparse +lora+adapter"
