"""SparseGPT and structured pruning on the tiny random Llama: exact patterns, lower error than magnitude, a smaller
standard config that plain transformers reloads, plan-time errors, and chains through the runner."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, run_project, tiny_params
from pipeline.checks import check
from pipeline.config import CalibrationCfg, ConfigError, ModelCfg, PruneCfg, parse_params
from pipeline.models import LM, load_base
from pipeline.plan import PlanError, build_plan
from pipeline.runner import artifact_path
from pipeline.stages import prune as P

CPU = torch.device("cpu")


def fresh_lm(model_dir) -> LM:
    model, tok = load_base(model_dir, "hf", ModelCfg(source=str(model_dir), device="cpu"), CPU)
    return LM(model, tok, None, CPU)


@pytest.fixture(scope="module")
def calib(tiny_model) -> list[torch.Tensor]:
    from pipeline import data

    cfg = CalibrationCfg(files=str(DATA / "c4-en-train-first1000" / "c4_sample.jsonl"), format="json", samples=16,
                         seq_len=64)
    return data.calibration(fresh_lm(tiny_model).tokenizer, cfg, seed=0)


@pytest.fixture(scope="module")
def heldout(tiny_model) -> torch.Tensor:
    from pipeline import data

    text = (DATA / "wikitext2-raw-v1" / "wiki.test.raw").read_text()[:40_000]
    return data.tokenize(fresh_lm(tiny_model).tokenizer, text, max_tokens=512)


def pruned(tiny_model, calib, **kw) -> LM:
    lm = fresh_lm(tiny_model)
    cfg = PruneCfg(kind="prune", **kw)
    P.prune(lm, cfg, calib if cfg.method != "magnitude" else None)
    return lm


@torch.no_grad()
def logit_error(lm: LM, dense: LM, ids: torch.Tensor) -> float:
    """Mean squared difference of the logits to the dense model's on held-out windows: the output reconstruction error."""
    wins = ids[: ids.numel() // 64 * 64].view(-1, 64)
    return float(((lm.logits(wins) - dense.logits(wins)) ** 2).mean())


@torch.no_grad()
def kl_to_dense(lm: LM, dense: LM, ids: torch.Tensor) -> float:
    """Mean KL(dense || pruned) of the next-token distributions on held-out windows."""
    wins = ids[: ids.numel() // 64 * 64].view(-1, 64)
    logp, logq = dense.logits(wins).log_softmax(-1), lm.logits(wins).log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_sparsegpt_unstructured_exact_per_row(tiny_model, calib):
    lm = pruned(tiny_model, calib, method="sparsegpt", sparsity=0.5)
    for name, lin in P.block_linears(lm.base).items():
        zeros = (lin.weight == 0).sum(1)
        assert torch.all(zeros == lin.in_features // 2), name


def test_sparsegpt_2_4_exact(tiny_model, calib):
    lm = pruned(tiny_model, calib, method="sparsegpt", pattern="2:4")
    for name, lin in P.block_linears(lm.base).items():
        per_group = (lin.weight.reshape(-1, 4) == 0).sum(1)
        assert torch.all(per_group == 2), name


def test_sparsegpt_updates_the_kept_weights(tiny_model, calib):
    """The OBS update changes the surviving weights (magnitude and Wanda only zero some)."""
    dense = P.block_linears(fresh_lm(tiny_model).base)
    lm = pruned(tiny_model, calib, method="sparsegpt", sparsity=0.5)
    for name, lin in P.block_linears(lm.base).items():
        kept = lin.weight != 0
        assert not torch.allclose(lin.weight[kept], dense[name].weight[kept]), name


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_at_equal_sparsity(tiny_model, calib, heldout, pattern):
    dense = fresh_lm(tiny_model)
    kw = {"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern}
    err = {m: logit_error(pruned(tiny_model, calib, method=m, **kw), dense, heldout) for m in ("magnitude", "sparsegpt")}
    assert err["sparsegpt"] < 0.8 * err["magnitude"], err
    # a random model's perplexity is ~ its vocabulary whatever is pruned: compare next-token distributions instead
    kl = {m: kl_to_dense(pruned(tiny_model, calib, method=m, **kw), dense, heldout) for m in ("magnitude", "sparsegpt")}
    assert kl["sparsegpt"] < kl["magnitude"], kl


# ---------------------------------------------------------------- structured
STRUCT = {"kind": "prune", "method": "wanda", "pattern": "structured", "ffn_sparsity": 0.5, "head_groups": 1}


@pytest.fixture(scope="module")
def shrunk(tiny_model, calib):
    small, info = P.structured(fresh_lm(tiny_model), PruneCfg(**STRUCT), calib)
    return small, info


def test_structured_gives_a_smaller_standard_config(tiny_model, shrunk):
    small, info = shrunk
    base = json.loads((tiny_model / "config.json").read_text())
    c = small.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (128, 2, 1, 32)
    assert base["intermediate_size"] == 256 and base["num_attention_heads"] == 4 and base["num_key_value_heads"] == 2
    assert info["params_after"] == sum(p.numel() for p in small.parameters()) < info["params_before"]
    layer = small.model.layers[0]
    assert layer.mlp.down_proj.weight.shape == (128, 128) and layer.self_attn.q_proj.weight.shape == (64, 128)
    assert layer.self_attn.k_proj.weight.shape == (32, 128) and layer.self_attn.o_proj.weight.shape == (128, 64)


@torch.no_grad()
def test_structured_equals_the_dense_model_with_those_units_zeroed(tiny_model, shrunk, heldout):
    """Removing channels / head groups is exactly zeroing their contributions in the dense model."""
    small, _ = shrunk
    dense = fresh_lm(tiny_model).base
    hd = 32
    for big, sm in zip(dense.model.layers, small.model.layers):
        rows = big.mlp.gate_proj.weight
        kept = [int(torch.nonzero((rows == r).all(1))[0]) for r in sm.mlp.gate_proj.weight]
        drop = sorted(set(range(rows.shape[0])) - set(kept))
        big.mlp.down_proj.weight[:, drop] = 0
        q = big.self_attn.q_proj.weight.view(-1, hd, rows.shape[1])  # [heads, head_dim, hidden]
        kept_heads = {int(torch.nonzero((q == h).all(2).all(1))[0]) for h in sm.self_attn.q_proj.weight.view(-1, hd, rows.shape[1])}
        for h in set(range(q.shape[0])) - kept_heads:
            big.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    ids = heldout[:128].view(2, 64)
    torch.testing.assert_close(small(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(m(ids).logits, sys.argv[3])
print(type(m).__name__, m.config.intermediate_size, m.config.num_attention_heads, m.config.num_key_value_heads)
"""


def test_structured_node_reloads_with_plain_transformers(tmp_path, tiny_model):
    """Through the runner: the artifact is a standard HF dir; a fresh process with plain transformers gives the same
    logits as the pipeline's loader, and the node's metrics show the smaller model."""
    from pipeline.models import load_lm

    p = tiny_params(tiny_model)
    p["stages"]["struct"] = STRUCT
    p["orderings"] = {"s": ["struct"]}
    params, results = run_project(tmp_path, p)
    path = tmp_path / artifact_path("struct")
    ids = torch.randint(0, 300, (2, 32))
    torch.save(ids, tmp_path / "ids.pt")
    out = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["LlamaForCausalLM", "128", "2", "1"]
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        ours = load_lm(path, params.model).logits(ids)
    torch.testing.assert_close(plain, ours, rtol=1e-5, atol=1e-5)
    r, b = results["struct"], results["base"]
    assert r["params"]["total"] == r["prune"]["structured"]["params_after"] < b["params"]["total"]
    assert r["size"]["bytes"] < b["size"]["bytes"] and r["state"] == "fp structured"
    assert r["size"]["bitmask_bytes_est"] is None  # no zeros: the estimate does not apply


@pytest.mark.parametrize("change, field", [
    ({"sparsity": 0.3}, "ffn_sparsity"),
    ({"method": "sparsegpt"}, "method wanda"),
    ({"ffn_sparsity": 0, "head_groups": 0}, "removes nothing"),
    ({"pattern": "unstructured"}, "pattern: structured"),
    ({"head_groups": -1}, "head_groups"),
])
def test_bad_structured_params_fail_in_one_line(tiny_model, change, field):
    p = tiny_params(tiny_model)
    p["stages"]["struct"] = {**STRUCT, **change}
    with pytest.raises(ConfigError) as exc:
        parse_params(p)
    msg = str(exc.value)
    assert "\n" not in msg and "stages.struct" in msg and field in msg, msg


@pytest.mark.parametrize("stage, words", [
    ({"method": "sparsegpt", "pattern": "2:4", "blocksize": 6}, "multiple of M=4"),
    ({"method": "wanda", "damp": 0.1}, "method sparsegpt only"),
    ({"method": "sparsegpt", "damp": 0}, "damp"),
])
def test_bad_sparsegpt_params_fail_in_one_line(tiny_model, stage, words):
    p = tiny_params(tiny_model)
    p["stages"]["sg"] = {"kind": "prune", **stage}
    with pytest.raises(ConfigError) as exc:
        parse_params(p)
    msg = str(exc.value)
    assert "\n" not in msg and "stages.sg" in msg and words in msg, msg


@pytest.mark.parametrize("stage, chain, where, words", [
    ({**STRUCT, "ffn_sparsity": 0.1, "channel_multiple": 128}, ["struct"], "stages.struct.ffn_sparsity", "kept"),
    ({**STRUCT, "head_groups": 2}, ["struct"], "stages.struct.head_groups", "at most 1"),
    # 256 * 0.75 = 192 channels: a later GPTQ group of 128 does not divide down_proj's in_features
    ({**STRUCT, "ffn_sparsity": 0.25, "channel_multiple": 64, "head_groups": 0}, ["struct", "gptq4_base"],
     "stages.gptq4_base.group_size", "after the structured prune struct"),
])
def test_structured_shapes_are_checked_at_plan_time(project, tiny_model, stage, chain, where, words):
    p = tiny_params(tiny_model)
    p["stages"].update({"struct": stage, "gptq4_base": {"kind": "quantize", "method": "gptq", "group_size": 128}})
    p["orderings"] = {"o": chain}
    params = parse_params(p)
    with pytest.raises(PlanError) as exc:
        check(params, build_plan(params))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(where) and words in msg, msg


def test_structured_then_gptq_with_a_dividing_group_plans(project, tiny_model):
    p = tiny_params(tiny_model)
    p["stages"].update({"struct": {**STRUCT, "ffn_sparsity": 0.25, "channel_multiple": 64, "head_groups": 0},
                        "gptq64": {"kind": "quantize", "method": "gptq", "group_size": 64}})
    p["orderings"] = {"o": ["struct", "gptq64"]}
    params = parse_params(p)
    check(params, build_plan(params))


# ---------------------------------------------------------------- chains through the runner
@pytest.mark.integration
def test_chains_structured_nf4_and_sparsegpt_peft(tmp_path, tiny_model):
    p = tiny_params(tiny_model)
    p["stages"].update({"struct": {**STRUCT, "head_groups": 0}, "sgpt24": {"kind": "prune", "method": "sparsegpt", "pattern": "2:4"}})
    p["orderings"] = {"struct_nf4": ["struct", "nf4"], "sgpt_peft": ["sgpt24", "lora_only", "merge"]}
    params, r = run_project(tmp_path, p)
    assert r["struct-nf4"]["state"] == "nf4 structured"
    assert r["struct-nf4"]["params"]["total"] == r["struct"]["params"]["total"] < r["base"]["params"]["total"]
    assert r["struct-nf4"]["size"]["bytes"] < r["struct"]["size"]["bytes"]
    assert r["sgpt24"]["prune"]["measured_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert r["sgpt24"]["size"]["bitmask_bytes_est"] < r["sgpt24"]["size"]["bytes"]
    merged = load_file(tmp_path / artifact_path("sgpt24-lora_only-merge") / "model.safetensors")
    for k, w in merged.items():
        if ".layers." in k and k.endswith("proj.weight"):
            assert torch.all((w.reshape(-1, 4) == 0).sum(1) == 2), k  # the merge kept the 2:4 mask
