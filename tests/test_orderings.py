"""Orderings the brief names beyond the default trie: PEFT over a GPTQ base (then merge), and PTQ of the base
weights under unmerged PEFT (NF4 and GPTQ), on the tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import run_project, tiny_params
from pipeline import artifact
from pipeline.plan import build_plan
from pipeline.runner import artifact_path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("orderings")
    p = tiny_params(tiny_model)
    p["stages"].update({
        "gptq_base": {"kind": "quantize", "method": "gptq", "group_size": 128},
        "lora_fast": {"kind": "peft", "methods": ["lora"], "steps": 8, "seq_len": 64, "lr": 0.01},
        "nf4_ptq": {"kind": "ptq", "method": "nf4"},
        "lora_seeds": {"kind": "peft", "methods": ["lora", "adapter"], "steps": 4, "seq_len": 64, "lr": 0.01,
                       "seeds": [0, 1, 2]},
    })
    p["orderings"] = {"gptq_then_lora": ["gptq_base", "lora_fast", "merge"],
                      "nf4_under_peft": ["hybrid", "nf4_ptq", "merge"],
                      "gptq_under_peft": ["hybrid", "gptq4"], "seeds": ["lora_seeds", "merge"]}
    params, results = run_project(root, p)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    yield root, params, results
    mp.undo()


def test_lora_trains_over_a_gptq_base_and_merges(runs):
    _, _, r = runs
    node = r["gptq_base-lora_fast"]
    assert node["state"] == "gptq +lora"
    assert node["train"]["loss_last"] < node["train"]["loss_first"]
    assert node["ppl"]["domain_heldout"] < r["gptq_base"]["ppl"]["domain_heldout"]
    merged = r["gptq_base-lora_fast-merge"]
    err = merged["merge_error"]
    assert err["dequantized_from"] == "gptq" and err["max_abs_logit_diff"] < 1e-2
    assert merged["ppl"]["domain_heldout"] == pytest.approx(node["ppl"]["domain_heldout"], rel=1e-2)
    assert artifact.read_manifest(artifact_path("gptq_base-lora_fast-merge"))["format"] == "hf"


def test_ptq_under_peft_keeps_fp32_peft_parts(runs):
    root, _, r = runs
    for name, fmt in (("hybrid-nf4_ptq", "nf4"), ("hybrid-gptq4", "gptq")):
        path = artifact_path(name)
        assert artifact.read_manifest(path)["format"] == fmt and r[name]["state"].startswith(f"{fmt} +lora")
        lora = load_file(path / "peft" / "lora" / "adapter_model.safetensors")
        hybrid = load_file(path / "peft" / "hybrid.safetensors")
        assert all(t.dtype.is_floating_point and t.element_size() == 4 for t in [*lora.values(), *hybrid.values()])
        assert r[name]["params"]["peft"] == r["hybrid"]["params"]["peft"]
        assert r[name]["size"]["bits_per_weight"] < r["hybrid"]["size"]["bits_per_weight"] / 2
        # quantizing the base under the PEFT parts costs little on the domain the PEFT parts were trained for
        assert r[name]["ppl"]["domain_heldout"] == pytest.approx(r["hybrid"]["ppl"]["domain_heldout"], rel=0.1)
    err = r["hybrid-nf4_ptq-merge"]["merge_error"]
    assert err["dequantized_from"] == "nf4" and err["max_abs_logit_diff"] < 1e-2


RELOAD = """
import json, sys
from pipeline.config import load_params
from pipeline.stages.evaluate import corpus_nlls
from pipeline.models import load_lm
params = load_params("params.yaml")
print(json.dumps({n: corpus_nlls(load_lm("artifacts/" + n, params.model), params)[0] for n in sys.argv[1:]}))
"""


@pytest.mark.integration
def test_ptq_under_peft_reloads_in_a_fresh_process(runs):
    root, _, r = runs
    names = ["hybrid-nf4_ptq", "hybrid-gptq4", "gptq_base-lora_fast"]
    proc = subprocess.run([sys.executable, "-c", RELOAD, *names], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        for corpus, nll in fresh[name].items():
            assert nll == pytest.approx(json.loads((root / "metrics" / f"{name}.json").read_text())["nll_per_window"][corpus],
                                        abs=1e-4), (name, corpus)


def test_several_seeds_report_mean_and_spread(runs):
    from pipeline import report

    root, params, r = runs
    node = r["lora_seeds"]
    path = artifact_path("lora_seeds")
    assert [p.name for p in sorted((path / "peft" / "seeds").iterdir())] == ["1", "2"]
    assert set(node["seeds"]) == {"1", "2"} and len(node["train_seeds"]) == 3
    domain = [node["ppl"]["domain_heldout"]] + [s["ppl"]["domain_heldout"] for s in node["seeds"].values()]
    assert len(set(domain)) == 3  # three trainings, three results
    assert node["size"]["peft_bytes"] < artifact.dir_bytes(path / "peft") / 2  # other seeds are not deployed
    assert not (artifact_path("lora_seeds-merge") / "peft" / "seeds").exists()  # children build on the first seed
    assert "over 3 seeds" in report.table(list(r.values()), ["wiki", "domain_heldout"], build_plan(params).leaves)
