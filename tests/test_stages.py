"""Every stage kind on a tiny random Llama, through the runner: artifacts, metrics, reload in a fresh process."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_project, tiny_params
from pipeline import artifact, report
from pipeline.config import load_params
from pipeline.plan import build_plan
from pipeline.runner import artifact_path, metrics_path, node_status, run_node


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model):
    """The whole tiny plan, run once, node by node, in-process."""
    root = tmp_path_factory.mktemp("proj")
    params, results = run_project(root, tiny_params(tiny_model))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    yield root, params, results
    mp.undo()


def block_weights(path: Path) -> dict[str, torch.Tensor]:
    sd = load_file(artifact.weights_dir(path) / "model.safetensors")
    return {k: v for k, v in sd.items() if ".layers." in k and k.endswith("proj.weight")}


def test_every_node_has_artifact_and_metrics(tiny_run):
    root, params, results = tiny_run
    plan = build_plan(params)
    assert set(results) == set(plan.nodes)
    assert set(node_status(params, plan).values()) == {"cached"}
    for name, r in results.items():
        man = artifact.read_manifest(artifact_path(name))
        assert man["fingerprint"] and man["stats"]["total"] > 0 and man["libraries"]["torch"]
        assert json.loads(metrics_path(name).read_text())["node"] == name
        assert set(r["ppl"]) == {"wiki", "domain_heldout"} and all(math.isfinite(v) for v in r["ppl"].values())
        assert r["latency"]["prefill_tok_s"] > 0 and r["latency"]["decode_tok_s"] > 0
        assert r["peak_memory_mb"]["stage+eval"] >= r["peak_memory_mb"]["stage"] > 0
    assert not list((root / "artifacts").glob(".*tmp*")), "a temp dir was left behind"


def test_wanda_2_4_pattern(tiny_run):
    _, _, results = tiny_run
    for name, w in block_weights(artifact_path("wanda24")).items():
        per_group = (w.reshape(-1, 4) != 0).sum(1)
        assert per_group.max() <= 2, name
        assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01), name
    assert results["wanda24"]["prune"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    base = load_file(artifact_path("base") / "model.safetensors")
    pruned = load_file(artifact_path("wanda24") / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], pruned["model.embed_tokens.weight"])


def test_magnitude_unstructured_rows(tiny_run):
    for name, w in block_weights(artifact_path("hybrid-merge-mag50")).items():
        zeros_per_row = (w == 0).sum(1)
        assert zeros_per_row.min() >= w.shape[1] // 2, name


def test_nf4_quantize(tiny_run):
    _, _, results = tiny_run
    cfg = json.loads((artifact_path("wanda24-nf4") / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    r, parent = results["wanda24-nf4"], results["wanda24"]
    assert r["size"]["bits_per_weight"] < parent["size"]["bits_per_weight"] / 2
    assert r["params"]["total"] == parent["params"]["total"]  # logical count, not packed storage
    assert r["params"]["sparsity"] == pytest.approx(parent["params"]["sparsity"], abs=0.01)  # NF4 keeps exact zeros
    assert r["ppl"]["wiki"] == pytest.approx(parent["ppl"]["wiki"], rel=0.05)


def test_peft_adds_only_adapters_and_trains(tiny_run):
    _, _, results = tiny_run
    path = artifact_path("hybrid")
    man = artifact.read_manifest(path)
    assert man["weights"] == "../base" and not list(path.glob("*.safetensors"))
    assert (path / "peft" / "lora" / "adapter_config.json").is_file() and (path / "peft" / "hybrid.json").is_file()
    r = results["hybrid"]
    assert r["size"]["own_bytes"] < results["base"]["size"]["own_bytes"] / 10
    assert r["train"]["loss_last"] < r["train"]["loss_first"]
    assert r["ppl"]["domain_heldout"] < results["base"]["ppl"]["domain_heldout"]
    assert r["params"]["peft"] == r["train"]["trainable_params"] > 0
    assert r["train"]["peak_memory_mb"] > 0 and r["train"]["tokens_per_s"] > 0
    lora = results["lora_only"]
    assert not (artifact_path("lora_only") / "peft" / "hybrid.json").exists()
    assert lora["params"]["peft"] == lora["train"]["trainable_params"]
    # QLoRA: the same PEFT code over an NF4 base
    assert artifact.read_manifest(artifact_path("wanda24-nf4-hybrid"))["format"] == "nf4"


def test_merge_fp_is_exact_and_keeps_modules(tiny_run):
    _, _, results = tiny_run
    err = results["hybrid-merge"]["merge_error"]
    assert err["max_abs_logit_diff"] < 1e-3
    assert err["ppl_merged"] == pytest.approx(err["ppl_unmerged"], rel=1e-4)
    path = artifact_path("hybrid-merge")
    assert not (path / "peft" / "lora").exists() and (path / "peft" / "hybrid.json").is_file()
    assert results["hybrid-merge"]["ppl"]["domain_heldout"] == pytest.approx(results["hybrid"]["ppl"]["domain_heldout"], rel=1e-3)


def test_merge_nf4_dequantizes_and_keeps_mask(tiny_run):
    _, _, results = tiny_run
    err = results["wanda24-nf4-hybrid-merge"]["merge_error"]
    assert err["dequantized_from"] == "nf4" and err["kept_mask"]
    assert artifact.read_manifest(artifact_path("wanda24-nf4-hybrid-merge"))["format"] == "hf"
    for name, w in block_weights(artifact_path("wanda24-nf4-hybrid-merge")).items():
        assert (w.reshape(-1, 4) != 0).sum(1).max() <= 2, name


def test_gptq_ptq(tiny_run):
    _, _, results = tiny_run
    path = artifact_path("hybrid-merge-mag50-gptq4")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4
    r = results["hybrid-merge-mag50-gptq4"]
    assert r["size"]["bits_per_weight"] < 16
    assert (path / "peft" / "hybrid.json").is_file()  # adapters kept in fp32 beside the GPTQ base
    assert r["ppl"]["wiki"] == pytest.approx(results["hybrid-merge-mag50"]["ppl"]["wiki"], rel=0.1)


RELOAD = """
import json, sys
from pipeline.config import load_params
from pipeline.models import load_lm
from pipeline.stages.evaluate import perplexity
from pipeline import data
params = load_params("params.yaml")
out = {}
for name in sys.argv[1:]:
    lm = load_lm("artifacts/" + name, params.model)
    ids = data.tokenize(lm.tokenizer, data.eval_texts(params.data)["domain_heldout"], params.evaluate.max_tokens)
    out[name] = perplexity(lm, ids, params.evaluate.seq_len)
print(json.dumps(out))
"""


def test_reload_in_fresh_process_reproduces_metrics(tiny_run):
    root, _, results = tiny_run
    names = ["base", "wanda24-nf4-hybrid", "hybrid-merge", "hybrid-merge-mag50-gptq4", "lora_only"]
    proc = subprocess.run([sys.executable, "-c", RELOAD, *names], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        assert fresh[name] == pytest.approx(results[name]["ppl"]["domain_heldout"], rel=1e-3), name


def test_report(tiny_run):
    root, params, results = tiny_run
    out = report.run(params)
    md = (root / "reports" / "compare.md").read_text()
    for name in results:
        assert f"`{name}`" in md
    assert "windows of 64 tokens" in md
    assert set(json.loads((root / "reports" / "compare.json").read_text())) == set(results)
    assert (root / "reports" / "pareto.png").stat().st_size > 10_000
    front = report.pareto(out["rows"], "domain_heldout")
    smallest = min(out["rows"], key=lambda r: r["size"]["bytes"])
    best = min(out["rows"], key=lambda r: r["ppl"]["domain_heldout"])
    assert smallest["node"] in front and best["node"] in front


def test_failed_stage_leaves_no_artifact(project, monkeypatch):
    from pipeline.stages import STAGES

    params = load_params("params.yaml")
    run_node("base", params)

    def boom(*_a, **_k):
        raise RuntimeError("killed mid-stage")

    monkeypatch.setattr(STAGES["prune"], "run", boom)
    with pytest.raises(RuntimeError, match="killed"):
        run_node("wanda24", params)
    assert not (project / "artifacts" / "wanda24").exists()
    assert [p.name for p in (project / "artifacts").iterdir() if not p.name.startswith(".")] == ["base"]
    assert not metrics_path("wanda24").exists()


def test_report_pareto_synthetic():
    rows = [{"node": n, "size": {"bytes": b}, "ppl": {"x": p}} for n, b, p in
            [("a", 10, 5.0), ("b", 5, 6.0), ("c", 7, 7.0), ("d", 1, 9.0), ("e", 10, 4.0)]]
    assert report.pareto(rows, "x") == ["d", "b", "e"]
