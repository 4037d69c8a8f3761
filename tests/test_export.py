"""Deployment: what loads each node (loads_with), linear adapters folded exactly by merge, and `pipeline export`
folders that reload in a fresh process with the plain libraries at the pipeline's perplexity."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import run_project, tiny_params
from pipeline import artifact, data, report
from pipeline.cli import app
from pipeline.plan import build_plan
from pipeline.runner import artifact_path

LOADER = artifact.HYBRID_LOADER
EXPORTED = ["hybrid_lin-merge", "hybrid", "nf4", "nf4-hybrid", "hybrid-merge", "prefixed", "nf4_e8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("deploy")
    p = tiny_params(tiny_model)
    p["stages"]["hybrid_lin"] = {"kind": "peft", "methods": ["lora", "adapter"], "adapter_act": "linear",
                                 "adapter_dim": 16, "steps": 8, "seq_len": 64, "lr": 0.01}
    p["stages"]["prefixed"] = {"kind": "peft", "methods": ["lora", "prefix", "prompt"], "prefix_tokens": 4,
                               "prompt_tokens": 4, "steps": 8, "seq_len": 64, "lr": 0.01}
    p["stages"]["nf4_e8"] = {"kind": "quantize", "method": "nf4", "embeddings": "int8"}
    p["orderings"] = {"linear": ["hybrid_lin", "merge"], "qlora": ["nf4", "hybrid"], "gelu": ["hybrid", "merge"],
                      "prefixed": ["prefixed"], "emb8": ["nf4_e8"]}
    params, results = run_project(root, p)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    yield root, params, results
    mp.undo()


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each node of EXPORTED exported through the CLI into its own folder."""
    out = tmp_path_factory.mktemp("exports")
    for node in EXPORTED:
        result = CliRunner().invoke(app, ["export", node, str(out / node), "-p", "params.yaml"])
        assert result.exit_code == 0, result.stderr
    return out


def test_linear_adapter_folds_exactly_into_down_proj(runs):
    root, _, r = runs
    err = r["hybrid_lin-merge"]["merge_error"]
    assert err["folded"] == ["lora", "adapter"]
    assert err["adapter_fold_max_abs_logit_diff"] < 1e-4 and err["max_abs_logit_diff"] < 1e-3
    assert err["ppl_merged"] == pytest.approx(err["ppl_unmerged"], rel=1e-5)
    # the adapter trained (its up projection left zero) and the fold changed every down_proj
    adapters = load_file(artifact_path("hybrid_lin") / "peft" / "hybrid.safetensors")
    assert set(adapters) == {f"adapters.{i}.{p}.weight" for i in range(2) for p in ("down", "up")}  # no biases
    assert all(adapters[f"adapters.{i}.up.weight"].abs().max() > 1e-4 for i in range(2))
    base, merged = (load_file(artifact_path(n) / "model.safetensors") for n in ("base", "hybrid_lin-merge"))
    for i in range(2):
        k = f"model.layers.{i}.mlp.down_proj.weight"
        assert (merged[k] - base[k]).abs().max() > 1e-4, k
    # nothing left beside the weights: a plain checkpoint, and the state says so
    man = artifact.read_manifest(artifact_path("hybrid_lin-merge"))
    assert not artifact.peft_dir(artifact_path("hybrid_lin-merge")).exists()
    assert man["state"]["modules"] == [] and man["state"]["adapter_act"] is None
    assert r["hybrid_lin"]["state"] == "fp +lora+adapter(linear)" and r["hybrid_lin-merge"]["state"] == "fp merged"
    assert r["hybrid_lin-merge"]["params"]["peft"] == 0


def test_plan_state_after_folding(tmp_path):
    from pipeline.config import parse_params
    from pipeline.plan import INEXACT_FOLD, build_plan

    raw = tiny_params(tmp_path)
    raw["stages"]["lin"] = {"kind": "peft", "methods": ["lora", "adapter", "prompt"], "adapter_act": "linear"}
    raw["orderings"] = {"dense": ["lin", "merge"], "sparse": ["mag50", "lin", "merge"], "gelu": ["hybrid", "merge"]}
    plan = build_plan(parse_params(raw))
    merged = plan.nodes["lin-merge"]
    assert merged.state.modules == ("prompt",) and merged.state.adapter_act is None and not merged.flags
    assert plan.nodes["hybrid-merge"].state.modules == ("adapter", "prompt")
    assert plan.nodes["mag50-lin-merge"].flags == [INEXACT_FOLD]  # keep_mask re-zeroes part of the folded down_proj
    raw["stages"]["lora_only"]["adapter_act"] = "linear"
    with pytest.raises(ValueError, match="adapter_act applies to the adapter method"):
        parse_params(raw)


def test_merged_linear_node_in_plain_transformers_matches_the_unmerged_node(runs):
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_lm

    _, params, r = runs
    unmerged = load_lm(artifact_path("hybrid_lin"), params.model)  # base + LoRA + adapter hooks
    plain = AutoModelForCausalLM.from_pretrained(artifact_path("hybrid_lin-merge"), dtype=torch.float32).eval()
    ids = data.tokenize(unmerged.tokenizer, data.eval_texts(params.data)["domain_heldout"], 128).view(2, 64)
    with torch.no_grad():
        diff = (unmerged.logits(ids) - plain(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
    assert r["hybrid_lin-merge"]["ppl"]["domain_heldout"] == pytest.approx(r["hybrid_lin"]["ppl"]["domain_heldout"], rel=1e-4)


def test_gelu_adapters_stay_modules_through_merge(runs):
    _, _, r = runs
    path = artifact_path("hybrid-merge")
    cfg = json.loads((path / "peft" / "hybrid.json").read_text())
    assert cfg["adapter_dim"] == 16 and cfg["adapter_act"] == "gelu" and cfg["prompt_tokens"] == 4
    assert r["hybrid-merge"]["merge_error"]["folded"] == ["lora"]
    assert artifact.read_manifest(path)["state"]["modules"] == ["adapter", "prompt"]


def test_loads_with_each_node_kind(runs):
    _, _, r = runs
    expected = {"base": ["transformers"], "nf4": ["transformers", "bitsandbytes"],
                "nf4-hybrid": ["transformers", "bitsandbytes", "peft", LOADER],
                "hybrid": ["transformers", "peft", LOADER], "hybrid-merge": ["transformers", LOADER],
                "hybrid_lin": ["transformers", "peft", LOADER], "hybrid_lin-merge": ["transformers"],
                "prefixed": ["transformers", "peft", LOADER], "nf4_e8": ["transformers", "bitsandbytes", LOADER]}
    assert {n: m["loads_with"] for n, m in r.items()} == expected
    for name, libs in expected.items():
        assert artifact.loads_with(artifact.read_manifest(artifact_path(name))) == libs
    # GPTQ (transformers requires optimum beside gptqmodel) under unmerged LoRA, and one with only a prompt left
    assert artifact.loads_with({"format": "gptq", "state": {"lora": True, "modules": []}}) == [
        "transformers", "optimum", "gptqmodel", "peft"]
    assert artifact.loads_with({"format": "hf", "state": {"lora": False, "modules": ["prompt"]}}) == ["transformers", LOADER]


def test_report_shows_loads_with(runs):
    root, params, _ = runs
    out = report.run(params)
    header = next(line for line in out["markdown"].splitlines() if line.startswith("| node"))
    assert "| loads with |" in header
    row = next(line for line in out["markdown"].splitlines() if line.startswith("| `nf4-hybrid`"))
    assert f"transformers + bitsandbytes + peft + {LOADER}" in row
    summary = json.loads((root / "reports" / "compare.json").read_text())
    assert summary["hybrid_lin-merge"]["loads_with"] == "transformers"
    with open(root / "reports" / "nodes.csv") as fh:
        rows = {row["node"]: row for row in csv.DictReader(fh)}
    assert rows["nf4"]["loads_with"] == "transformers + bitsandbytes"


def test_export_layout(exports):
    fp = exports / "hybrid_lin-merge"
    assert (fp / "model.safetensors").is_file() and (fp / "tokenizer.json").is_file()
    assert not (fp / "lora").exists() and not (fp / "hybrid").exists() and not (fp / "hybrid_loader.py").exists()
    peft = exports / "hybrid"  # a PEFT node over a referenced base: the base is copied in
    assert (peft / "model.safetensors").read_bytes() == (artifact_path("base") / "model.safetensors").read_bytes()
    assert json.loads((peft / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert {p.name for p in (peft / "hybrid").iterdir()} == {"hybrid.json", "hybrid.safetensors"}
    loader = (peft / "hybrid_loader.py").read_text()
    assert "import pipeline" not in loader and "from pipeline" not in loader
    readme = (peft / "README.md").read_text()
    assert "hybrid_loader.load(" in readme and "pip install torch transformers==" in readme and "peft==" in readme
    nf4 = json.loads((exports / "nf4" / "config.json").read_text())["quantization_config"]
    assert nf4["bnb_4bit_quant_type"] == "nf4"
    assert json.loads((exports / "nf4-hybrid" / "export.json").read_text())["loads_with"] == [
        "transformers", "bitsandbytes", "peft", LOADER]
    for node in EXPORTED:
        assert not list(exports.glob(f".{node}.tmp-*")) and (exports / node / "README.md").is_file()


# A fresh process with the plain libraries only: transformers (+ peft, bitsandbytes) for plain nodes, the export's
# own hybrid_loader.py where adapters / a prompt remain. Perplexity as the pipeline computes it: tokens without
# special tokens, the first max_tokens, non-overlapping windows, mean NLL per window.
FRESH = r"""
import json, math, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
texts, max_tokens, seq_len = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), int(sys.argv[3])


def plain(d, info):
    tok = AutoTokenizer.from_pretrained(d)
    kw = {"device_map": {"": "cpu"}} if info["format"] != "hf" else {}
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    if (d / "lora").is_dir():
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, d / "lora").eval()
    sample = tok.decode(model.generate(input_ids=tok("To be", return_tensors="pt").input_ids, max_new_tokens=3,
                                       do_sample=False)[0])
    return tok, lambda ids: model(input_ids=ids).logits, sample


def with_loader(d):
    sys.path.insert(0, str(d))
    sys.modules.pop("hybrid_loader", None)
    import hybrid_loader
    sys.path.remove(str(d))
    model, tok, hybrid = hybrid_loader.load(d)
    sample = hybrid_loader.generate(model, tok, hybrid, "To be", max_new_tokens=3)
    return tok, lambda ids: hybrid_loader.logits(model, hybrid, ids), sample


def perplexities(tok, logits_of):
    ppl = {}
    for name, text in texts.items():
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:max_tokens])
        wins = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(logits_of(wins)[:, :-1].float().flatten(0, 1),
                                                    wins[:, 1:].flatten(), reduction="none").view(len(wins), -1).mean(1)
        ppl[name] = math.exp(nll.mean().item())
    return ppl


out = {}
for d in map(Path, sys.argv[4:]):
    info = json.loads((d / "export.json").read_text())
    tok, logits_of, sample = plain(d, info)
    res = {"plain": perplexities(tok, logits_of), "sample": sample}
    if (d / "hybrid_loader.py").is_file():
        tok, logits_of, res["sample_loader"] = with_loader(d)
        res["loader"] = perplexities(tok, logits_of)
    out[info["node"]] = res
assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules), "the project was imported"
print(json.dumps(out))
"""


@pytest.mark.integration
def test_exports_reload_in_a_fresh_process_with_plain_libraries(runs, exports, tmp_path):
    """Each export at the pipeline's perplexity (0.5%) with exactly what its loads_with names: the plain clients
    alone for nodes without hybrid_loader, the export's hybrid_loader.py for the others, where the plain clients
    alone fall short (which is why loads_with names it)."""
    root, params, r = runs
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(data.eval_texts(params.data)))
    ev = params.evaluate
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(texts), str(ev.max_tokens), str(ev.seq_len),
                           *(str(exports / n) for n in EXPORTED)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for node in EXPORTED:
        needs_loader = LOADER in r[node]["loads_with"]
        assert ("loader" in fresh[node]) == needs_loader and fresh[node]["sample"], node
        for corpus, ppl in r[node]["ppl"].items():
            got = fresh[node]["loader" if needs_loader else "plain"][corpus]
            assert got == pytest.approx(ppl, rel=5e-3), (node, corpus)
            # the plain clients fall short: visibly on the tiny model's perplexity where modules are missing; a
            # missing (randomly initialised) embedding of a random tiny model can land near its perplexity by chance,
            # so test_int8_embedding_... checks that transformers alone reports it missing instead
            if needs_loader and not artifact.read_manifest(artifact_path(node))["state"].get("int8_embedding"):
                assert fresh[node]["plain"][corpus] != pytest.approx(ppl, rel=1e-2), (node, corpus)


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, lines)
    return lines[0]


def test_export_errors_are_one_line_and_write_nothing(runs, tmp_path):
    root, _, _ = runs
    dest = tmp_path / "out"
    assert "no node 'nope'" in _one_line_error(CliRunner().invoke(app, ["export", "nope", str(dest), "-p", "params.yaml"]))
    assert not dest.exists()
    # a node in the plan that was never built
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["orderings"]["extra"] = ["lora_only"]
    (root / "params-extra.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    line = _one_line_error(CliRunner().invoke(app, ["export", "lora_only", str(dest), "-p", "params-extra.yaml"]))
    assert "'lora_only' is not built" in line and "python -m pipeline run lora_only" in line
    assert not dest.exists() and not artifact_path("lora_only").exists()
    # a non-empty destination is left as it was
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    line = _one_line_error(CliRunner().invoke(app, ["export", "nf4", str(dest), "-p", "params.yaml"]))
    assert "not an empty directory" in line
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out.tmp-*"))


def test_int8_embedding_is_stored_apart_smaller_and_reloads_exactly(runs):
    """embeddings: int8 takes the embedding out of the checkpoint into int8 codes + a float16 scale per row; the
    node reloads to exactly those values (the stage's round-trip check), costs ~1/4 of the fp32 bytes, and a model
    loaded without the file is not the node."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.hybrid_loader import EMBED_INT8
    from pipeline.models import load_lm

    _, params, r = runs
    node, plain = artifact_path("nf4_e8"), artifact_path("nf4")
    parts = load_file(node / EMBED_INT8)
    assert parts["codes"].dtype == torch.int8 and parts["scale"].dtype == torch.float16
    with safe_open(node / "model.safetensors", framework="pt") as f:
        assert "model.embed_tokens.weight" not in f.keys()
    emb = load_lm(node, params.model).model.get_input_embeddings().weight
    assert torch.equal(emb, parts["codes"].float() * parts["scale"].float()[:, None])
    fp_emb = load_lm(plain, params.model).model.get_input_embeddings().weight
    assert 0 < (emb - fp_emb).abs().max() <= fp_emb.abs().max() / 127  # within half a step of the row's grid
    assert r["nf4_e8"]["size"]["bytes"] < r["nf4"]["size"]["bytes"]
    assert r["nf4_e8"]["ppl"]["wiki"] == pytest.approx(r["nf4"]["ppl"]["wiki"], rel=0.02)
    assert "int8-embedding" in build_plan(params).nodes["nf4_e8"].state.describe()
    from transformers import AutoModelForCausalLM  # transformers alone: the embedding is missing, not the node's

    _, info = AutoModelForCausalLM.from_pretrained(node, device_map={"": "cpu"}, output_loading_info=True)
    assert "model.embed_tokens.weight" in info["missing_keys"]
