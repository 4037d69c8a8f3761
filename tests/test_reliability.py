"""Never a stale or corrupt result shown as good: provenance, integrity, plan-time errors, faults and concurrency.

One test (or one parametrized case) per defect of the reliability issue, on the tiny model.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import ROOT, run_project, tiny_params
from pipeline import artifact
from pipeline.cli import app
from pipeline.config import ConfigError, load_params
from pipeline.plan import build_plan
from pipeline.runner import artifact_path, metrics_path, node_status, run_node


def params_at(root: Path, edit=None):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    if edit:
        edit(raw)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(root / "params.yaml")


def copy_model(src: Path, dst: Path, scale: float | None = None) -> Path:
    shutil.copytree(src, dst)
    if scale is not None:
        sd = load_file(dst / "model.safetensors")
        key = next(k for k in sd if k.endswith("q_proj.weight"))
        sd[key] = sd[key] * scale
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ---------------------------------------------------------------- 1, 2: provenance
def test_child_of_a_stale_parent_is_stale_and_refuses_to_build(project, tiny_model):
    params = params_at(project)
    run_node("base", params)
    run_node("wanda24", params)
    other = copy_model(tiny_model, project / "other-model")
    params = params_at(project, lambda r: r["model"].update(source=str(other)))  # same weights, another source
    status = node_status(params, build_plan(params))
    assert status["base"] == "stale" and status["wanda24"] == "stale"
    with pytest.raises(artifact.ArtifactError, match="parent base .*stale"):
        run_node("wanda24", params, force=True)


def test_model_and_data_are_fingerprinted_by_content(project, tiny_model):
    src = copy_model(tiny_model, project / "model")
    params = params_at(project, lambda r: r["model"].update(source=str(src)))
    run_node("base", params)
    plan = build_plan(params)
    assert node_status(params, plan)["base"] == "cached"
    copy_model(tiny_model, project / "tmp-model", scale=1.5)
    shutil.copy(project / "tmp-model" / "model.safetensors", src / "model.safetensors")  # overwritten in place
    assert node_status(params, plan)["base"] == "stale"
    params = params_at(project)
    run_node("base", params, force=True)
    with open(project / "data" / "wiki.txt", "a") as fh:  # an eval corpus edited in place
        fh.write("\nmore text\n")
    assert node_status(params, plan)["base"] == "stale"


def test_external_inputs_are_dvc_deps(project, tiny_model):
    from pipeline.dvcgen import generate

    outside = copy_model(tiny_model, project.parent / "outside-model")
    data = project.parent / "outside.txt"
    data.write_text((project / "data" / "wiki.txt").read_text())

    def edit(r):
        r["model"]["source"] = str(outside)
        r["data"]["eval"]["wiki"]["files"] = str(data)
    stages = generate(params_at(project, edit))["stages"]
    assert str(outside) in stages["base"]["deps"] and str(data) in stages["base"]["deps"]
    assert str(outside) not in stages["wanda24"]["deps"]  # the base artifact stands for it downstream


# ---------------------------------------------------------------- 4: integrity
CORRUPTIONS = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "zeroed": lambda f: f.write_bytes(bytes(f.stat().st_size)),
    "random": lambda f: f.write_bytes(os.urandom(f.stat().st_size)),
    "deleted": lambda f: f.unlink(),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """base + lora_only, built once; tests copy the project before corrupting it."""
    root = tmp_path_factory.mktemp("built")
    run_project(root, tiny_params(tiny_model, steps=2), ["base", "lora_only", "hybrid"])
    return root


@pytest.fixture
def built_copy(built, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("how", list(CORRUPTIONS))
@pytest.mark.parametrize("target", ["base/model.safetensors", "lora_only/peft/lora/adapter_model.safetensors",
                                    "hybrid/peft/hybrid.safetensors"])
def test_corrupt_artifact_is_detected_and_never_used(built_copy, how, target):
    params = params_at(built_copy)
    node = target.split("/")[0]
    f = built_copy / "artifacts" / target
    CORRUPTIONS[how](f)
    status = node_status(params, build_plan(params))
    assert status[node] == "corrupt"
    with pytest.raises(artifact.ArtifactError, match=f.name):
        artifact.verify(artifact_path(node))
    child = {"base": "wanda24", "lora_only": None, "hybrid": "hybrid-merge"}[node]
    if child:
        with pytest.raises(artifact.ArtifactError, match=f.name):
            run_node(child, params)
        assert not artifact_path(child).exists()
    else:
        assert status["base"] == "cached"


def test_lora_dropped_silently_cannot_pass_as_merged(built_copy):
    params = params_at(built_copy)
    shutil.rmtree(built_copy / "artifacts" / "hybrid" / "peft" / "lora")
    with pytest.raises(artifact.ArtifactError, match="missing"):
        run_node("hybrid-merge", params)


def test_full_verify_catches_a_change_that_keeps_size_and_mtime(built_copy):
    f = built_copy / "artifacts" / "base" / "model.safetensors"
    artifact.verify(f.parent)  # hash cached for this (size, mtime, inode)
    st = f.stat()
    with open(f, "r+b") as fh:  # in place: same inode, same size
        fh.seek(st.st_size // 2)
        fh.write(b"\x7f\x7f\x7f\x7f")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    artifact.verify(f.parent)  # the fast path trusts (size, mtime, inode) ...
    with pytest.raises(artifact.ArtifactError, match="checksum"):
        artifact.verify(f.parent, full=True)  # ... the full check does not


def test_nan_weights_fail_the_node(project, tiny_model):
    src = copy_model(tiny_model, project / "nan-model", scale=float("nan"))
    params = params_at(project, lambda r: r["model"].update(source=str(src)))
    with pytest.raises(FloatingPointError, match="perplexity on .* nan"):
        run_node("base", params)
    assert not metrics_path("base").exists()


# ---------------------------------------------------------------- 7: merge folds in fp32 whatever the run dtype
def test_merge_folds_lora_in_fp32_then_casts(built_copy, monkeypatch):
    import pipeline.models as models
    from pipeline.models import load_lm

    params = params_at(built_copy, lambda r: r["model"].update(dtype="bfloat16"))
    for node in ("base", "hybrid"):  # params changed (dtype): rebuild in fp32 (CPU computes in fp32)
        run_node(node, params)
    ref = load_lm(artifact_path("hybrid"), params.model, dtype=torch.float32).model.merge_and_unload()
    expected = {n: p.detach().to(torch.bfloat16) for n, p in ref.named_parameters() if "q_proj" in n}
    # what a GPU run does: compute in the dtype the user asked for (bf16)
    monkeypatch.setattr(models, "dtype_of", lambda cfg, device: getattr(torch, cfg.dtype))
    import pipeline.stages.merge as merge

    monkeypatch.setattr(merge, "dtype_of", models.dtype_of)
    result = run_node("hybrid-merge", params)
    sd = load_file(artifact_path("hybrid-merge") / "model.safetensors")
    for name, want in expected.items():
        assert sd[name].dtype == torch.bfloat16 and torch.equal(sd[name], want), name
    err = result["merge_error"]
    assert err["folded_in"] == "float32" and err["saved_as"] == "bfloat16"
    # the bound on the dtype asked for: merged bf16 logits within bf16 rounding of the unmerged bf16 model
    assert err["max_abs_logit_diff"] < 0.25


# ---------------------------------------------------------------- 11, 12, 13: faults and concurrency
FAULT = r"""
import os, signal, sys
point, node = sys.argv[1], sys.argv[2]
import pipeline.runner as runner, pipeline.stages.peft as peft, pipeline.stages.evaluate as ev

def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "stage":
    peft.train = die
elif point == "save":
    real = runner.save_weights
    def half_save(model, tok, out):  # a partial file on disk, then killed
        real(model, tok, out)
        f = out / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        die()
    runner.save_weights = half_save
elif point == "eval":
    ev.window_nlls = die
from pipeline.cli import main
sys.argv = ["pipeline", "run", node]
main()
"""


def cli(root: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", FAULT, fault, *args] if fault else [sys.executable, "-m", "pipeline", "run", *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_killed_runs_leave_nothing_half_done(project):
    arts = project / "artifacts"
    assert cli(project, "base", fault="save").returncode == -9
    assert not (arts / "base").exists() and list(arts.glob(".base.tmp-*"))  # partial work only in a temp dir

    assert cli(project, "base", fault="eval").returncode == -9
    assert (arts / "base" / "artifact.json").is_file() and not (project / "metrics" / "base.json").exists()
    assert not list(arts.glob(".base.tmp-*"))  # the dead run's temp dir was cleaned
    params = load_params("params.yaml")
    assert node_status(params, build_plan(params))["base"] == "not evaluated"
    plan = subprocess.run([sys.executable, "-m", "pipeline", "plan"], cwd=project, capture_output=True, text=True)
    assert "not evaluated" in plan.stdout
    created = artifact.read_manifest(arts / "base")["created"]
    assert cli(project, "base").returncode == 0
    assert artifact.read_manifest(arts / "base")["created"] == created  # evaluated, not rebuilt

    assert cli(project, "hybrid", fault="stage").returncode == -9
    assert not (arts / "hybrid").exists()
    done = cli(project, "hybrid")
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(node_status(params, build_plan(params)).values()) >= {"cached"}
    for node in ("base", "hybrid"):
        artifact.verify(arts / node, full=True)
    assert not list(arts.glob(".*.tmp-*"))


@pytest.mark.integration
def test_two_runs_of_one_node_at_once_both_succeed(project):
    a = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "base"], cwd=project,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    b = cli(project, "base")
    out_a, err_a = a.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (err_a[-1500:], b.stderr[-1500:])
    artifact.verify(project / "artifacts" / "base", full=True)
    assert json.loads((project / "metrics" / "base.json").read_text())["node"] == "base"


def test_stale_temp_dirs_of_dead_runs_are_removed(project):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = project / "artifacts" / f".base.tmp-{dead.pid}"
    live = project / "artifacts" / f".other.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    live.mkdir()
    run_node("base", load_params("params.yaml"))
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- 14: the report refuses stale metrics
def test_report_refuses_stale_metrics(built_copy):
    from pipeline import report

    params = params_at(built_copy, lambda r: r.update(orderings={"lora_only": ["lora_only"]}))
    report.run(params)
    params = params_at(built_copy, lambda r: r["evaluate"].update(max_tokens=512))
    with pytest.raises(report.StaleMetrics, match="base"):
        report.run(params)


# ---------------------------------------------------------------- 15: trust_remote_code reaches every load
def test_every_from_pretrained_passes_trust_remote_code():
    missing = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "from_pretrained"
                    and not (isinstance(call.func.value, ast.Name) and call.func.value.id == "PeftModel")):
                if "trust_remote_code" not in {k.arg for k in call.keywords}:
                    missing.append(f"{path.name}:{call.lineno}")
    assert not missing, missing


# ---------------------------------------------------------------- 8, 9, 10: bad input, one line, nothing written
def _set(path: str, value):
    def edit(raw, _root):
        *keys, last = path.split(".")
        d = raw
        for k in keys:
            d = d[k]
        d[last] = value
    return edit


def _drop(path: str):
    def edit(raw, _root):
        *keys, last = path.split(".")
        d = raw
        for k in keys:
            d = d[k]
        del d[last]
    return edit


def _file(rel: str, content: bytes, field: str | None = None):
    def edit(raw, root):
        (root / rel).write_bytes(content)
        if field:
            _set(field, rel)(raw, root)
    return edit


def _text(text: str):
    def edit(raw, root):
        (root / "params.yaml").write_text(text)
        return "raw-written"
    return edit


def _long_names(raw, _root):
    names = [f"stage_{i}_" + "x" * 38 for i in range(6)]
    raw["stages"].update({n: {"kind": "prune", "method": "magnitude", "sparsity": 0.1} for n in names})
    raw["orderings"]["long"] = names


BAD = [
    ("sparsity>1", _set("stages.mag50.sparsity", 1.5), "stages.mag50.sparsity"),
    ("sparsity<0", _set("stages.mag50.sparsity", -0.1), "stages.mag50.sparsity"),
    ("pattern 4:2", _set("stages.wanda24.pattern", "4:2"), "stages.wanda24.pattern"),
    ("pattern int", _set("stages.wanda24.pattern", 124), "in quotes"),
    ("sparsity with N:M", _set("stages.wanda24.sparsity", 0.5), "stages.wanda24"),
    ("N:M width vs in_features", _set("stages.wanda24.pattern", "2:3"), "stages.wanda24.pattern"),
    ("unknown prune method", _set("stages.mag50.method", "movement"), "stages.mag50.method"),
    ("unknown peft method", _set("stages.hybrid.methods", ["lora", "dora"]), "stages.hybrid.methods"),
    ("no peft method", _set("stages.hybrid.methods", []), "stages.hybrid.methods"),
    ("method twice", _set("stages.hybrid.methods", ["lora", "lora"]), "stages.hybrid.methods"),
    ("unknown key", _set("stages.hybrid.lora_rank", 4), "stages.hybrid.lora_rank"),
    ("lr inf", _set("stages.hybrid.lr", float("inf")), "stages.hybrid.lr"),
    ("lr nan", _set("stages.hybrid.lr", float("nan")), "stages.hybrid.lr"),
    ("lr 0", _set("stages.hybrid.lr", 0), "stages.hybrid.lr"),
    ("steps 0", _set("stages.hybrid.steps", 0), "stages.hybrid.steps"),
    ("lora target absent", _set("stages.hybrid.lora_targets", ["q_proj", "w_proj"]), "stages.hybrid.lora_targets"),
    ("kind typo", _set("stages.nf4.kind", "quantise"), "stages.nf4"),
    ("quant method", _set("stages.nf4.method", "int3"), "stages.nf4.method"),
    ("group size", _set("stages.gptq4.group_size", 96), "stages.gptq4.group_size"),
    ("bits", _set("stages.gptq4.bits", 5), "stages.gptq4.bits"),
    ("unknown config in ordering", _set("orderings.lora_only", ["lora_only", "gptq8"]), "orderings.lora_only[1]"),
    ("ordering name", _set("orderings.bad-name", ["nf4"]), "orderings.bad-name"),
    ("trailing newline in name", _set("orderings.ok\n", ["nf4"]), "orderings.ok\\n"),
    ("stage named base", _set("stages.base", {"kind": "merge"}), "stages.base"),
    ("empty ordering", _set("orderings.lora_only", []), "orderings.lora_only"),
    ("no orderings", _set("orderings", {}), "orderings"),
    ("merge first", _set("orderings.lora_only", ["merge"]), "ordering 'lora_only', position 1"),
    ("prune an nf4 model", _set("orderings.lora_only", ["nf4", "mag50"]), "ordering 'lora_only', position 2"),
    ("node name too long", _long_names, "node name is"),
    ("top-level key", _set("seeds", 1), "seeds"),
    ("seed type", _set("seed", "abc"), "seed"),
    ("domain missing", _drop("data.domain"), "data.domain"),
    ("reserved corpus name", _set("data.eval.domain_heldout", {"files": "data/wiki.txt"}), "data.eval.domain_heldout"),
    ("missing data file", _set("data.calibration.files", "data/nope.jsonl"), "data/nope.jsonl"),
    ("empty data file", _file("data/empty.txt", b"", "data.domain.files"), "data/empty.txt"),
    ("binary data file", _file("data/blob.txt", bytes(range(256)) * 8, "data.eval.wiki.files"), "data/blob.txt"),
    ("non-JSON data file", _file("data/bad.jsonl", b"this is not json\n", "data.calibration.files"), "data/bad.jsonl"),
    ("JSON field absent", _set("data.calibration.field", "body"), "data.calibration.field"),
    ("calibration samples 0", _set("data.calibration.samples", 0), "data.calibration.samples"),
    ("heldout fraction 1", _set("data.domain.heldout_fraction", 1.0), "data.domain.heldout_fraction"),
    ("seq_len > max_tokens", _set("evaluate.seq_len", 512), "evaluate.seq_len"),
    ("seq_len tiny", _set("evaluate.seq_len", 4), "evaluate.seq_len"),
    ("cuda without GPU", _set("model.device", "cuda"), "model.device"),
    ("device name", _set("model.device", "tpu"), "model.device"),
    ("model dir missing", _set("model.source", "/nonexistent/model"), "model.source"),
    ("model dir without config", _set("model.source", "data"), "model.source"),
    ("dtype", _set("model.dtype", "int8"), "model.dtype"),
    ("YAML duplicate key", _text("seed: 0\nseed: 1\n"), "params.yaml:2:1"),
    ("YAML syntax", _text("stages: [unclosed\n"), "params.yaml:2:1"),
    ("YAML not a mapping", _text("- a\n- b\n"), "top level must be a mapping"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for d in ("artifacts", "metrics") for p in (root / d).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def base_project(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("bad")
    run_project(root, tiny_params(tiny_model), ["base"])
    return root


@pytest.mark.parametrize("case, edit, names", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_line_naming_it_and_nothing_written(base_project, tmp_path, monkeypatch, case, edit, names):
    root = tmp_path / "proj"
    shutil.copytree(base_project, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    if edit(raw, root) != "raw-written":
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = snapshot(root)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["run", "base", "-p", "params.yaml"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout[-500:], result.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert names in lines[0], lines[0]
    assert snapshot(root) == before
    assert not (root / "logs").exists()


def test_params_file_missing_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", "-p", "nope.yaml"])
    assert result.exit_code == 2 and "nope.yaml: file not found" in result.stderr


def test_unquoted_2_4_reads_as_dvc_reads_it(tmp_path):
    raw = (ROOT / "params.yaml").read_text().replace("{kind: prune, method: wanda, sparsity: 0.5}",
                                                     "{kind: prune, method: wanda, pattern: 2:4}")
    (tmp_path / "params.yaml").write_text(raw)
    assert load_params(tmp_path / "params.yaml").stages["wanda50"].pattern == "2:4"


def test_runtime_failure_is_one_line_with_a_log(built_copy):
    (built_copy / "artifacts" / "base" / "model.safetensors").write_bytes(b"broken")
    result = CliRunner().invoke(app, ["run", "wanda24"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert "wanda24" in lines[0] and "model.safetensors" in lines[0] and "traceback in logs/pipeline/" in lines[0]
    log = built_copy / lines[0].split("traceback in ")[1].split(";")[0]
    assert "Traceback" in log.read_text()


def test_paths_are_relative_to_the_params_file(built, tmp_path, monkeypatch):
    root = tmp_path / "proj"
    shutil.copytree(built, root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["run", "wanda24", "-p", str(root / "params.yaml")])
    assert result.exit_code == 0, result.stderr
    assert not (elsewhere / "artifacts").exists() and (root / "artifacts" / "wanda24").is_dir()
    assert (root / "metrics" / "wanda24.json").is_file()


def test_config_error_type():
    with pytest.raises(ConfigError):
        load_params(ROOT / "does-not-exist.yaml")
