"""Integration: real DVC (repro, no-op repro, subtree rerun, the repo lock) and the Prefect flow, on tiny params."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params, write_data
from pipeline.config import load_params
from pipeline.dvcgen import render

pytestmark = pytest.mark.integration


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran_stages(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def small_params(model: Path) -> dict:
    p = tiny_params(model, steps=2)
    p["stages"] = {k: p["stages"][k] for k in ("mag50", "lora_only", "merge")}
    p["orderings"] = {"lora_merge": ["lora_only", "merge"], "pruned": ["mag50"]}
    return p


def make_repo(path: Path, model: Path) -> Path:
    """A git + DVC project using the installed package, with tiny params, its generated dvc.yaml and the project's
    DVC cache settings. The model is a copy outside the repo (an external dependency, as a user's would be)."""
    path.mkdir(parents=True, exist_ok=True)
    write_data(path)
    outside = path.parent / f"{path.name}-model"
    shutil.copytree(model, outside)
    (path / "params.yaml").write_text(yaml.safe_dump(small_params(outside), sort_keys=False))
    sh(["git", "init", "-q"], path)
    sh(["git", "config", "user.email", "ci@example.com"], path)
    sh(["git", "config", "user.name", "ci"], path)
    sh(["dvc", "init", "-q"], path)
    sh(["dvc", "config", "core.analytics", "false"], path)
    cache_type = re.search(r'type = "([^"]+)"', (ROOT / ".dvc" / "config").read_text())[1]
    sh(["dvc", "config", "cache.type", cache_type], path)
    sh([sys.executable, "-m", "pipeline", "dvc-yaml"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-qm", "init"], path)
    return path


def test_committed_dvc_yaml_is_fresh():
    params = load_params(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == render(params, ROOT), "dvc.yaml is stale: run python -m pipeline dvc-yaml"


def test_cli_bad_params_one_line_and_writes_nothing(tmp_path):
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["stages"]["wanda50"]["sparsity"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    proc = sh([sys.executable, "-m", "pipeline", "dvc-yaml"], tmp_path, check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "stages.wanda50.sparsity" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_dvc_repro_noop_and_subtree_rerun(tmp_path, tiny_model):
    repo = make_repo(tmp_path / "repo", tiny_model)
    first = sh(["dvc", "repro"], repo)
    assert ran_stages(first.stdout) == {"base", "lora_only", "lora_only-merge", "mag50", "report"}
    assert (repo / "reports" / "compare.md").is_file() and (repo / "reports" / "pareto.png").is_file()

    second = sh(["dvc", "repro"], repo)
    assert ran_stages(second.stdout) == set(), second.stdout

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["stages"]["lora_only"]["lora_r"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(["dvc", "status", "--json"], repo)
    changed = set(json.loads(status.stdout))
    assert {"lora_only"} <= changed and not changed & {"base", "mag50"}
    third = sh(["dvc", "repro"], repo)
    assert ran_stages(third.stdout) == {"lora_only", "lora_only-merge", "report"}
    assert json.loads((repo / "metrics" / "lora_only.json").read_text())["train"]["trainable_params"] > 0

    # two `dvc repro` at once in one workspace (what parallel Prefect tasks do): sibling stages both finish, and the
    # workspace stays consistent. DVC releases its repo lock while a stage command runs; per-output locks guard files.
    a = subprocess.Popen(["dvc", "--wait-for-lock", "repro", "--force", "-s", "mag50"], cwd=repo,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = sh(["dvc", "--wait-for-lock", "repro", "--force", "-s", "lora_only"], repo)
    assert a.wait(timeout=600) == 0, a.stdout.read()
    assert "Running stage 'lora_only'" in b.stdout
    sh(["dvc", "repro"], repo)
    assert sh(["dvc", "status", "--json"], repo).stdout.strip() in ("{}", "")
    assert json.loads((repo / "metrics" / "mag50.json").read_text())["node"] == "mag50"
    # the plain CLI view agrees: everything cached
    plan = sh([sys.executable, "-m", "pipeline", "plan"], repo).stdout
    assert "to run" not in plan and "stale" not in plan and "cached" in plan


def test_cache_survives_in_place_writes_and_external_changes_are_seen(tmp_path, tiny_model):
    from pipeline import artifact

    repo = make_repo(tmp_path / "repo", tiny_model)
    sh(["dvc", "repro", "base", "mag50"], repo)
    weights = repo / "artifacts" / "base" / "model.safetensors"
    good = weights.read_bytes()
    with open(weights, "r+b") as fh:  # an in-place write into an output (what a hardlinked cache would share)
        fh.truncate(len(good) // 2)
    assert "base" in json.loads(sh(["dvc", "status", "--json"], repo).stdout)
    sh(["dvc", "repro", "base", "mag50"], repo)
    assert weights.read_bytes() == good  # restored or rebuilt: never the truncated file
    artifact.verify(weights.parent, full=True)
    status = json.loads(sh(["dvc", "status", "--json"], repo).stdout or "{}")
    assert "base" not in status and "mag50" not in status, status
    # the base model lives outside the repo: overwriting its weights in place makes base (and mag50) stale
    model = Path(yaml.safe_load((repo / "params.yaml").read_text())["model"]["source"])
    with open(model / "model.safetensors", "r+b") as fh:
        fh.seek(-64, 2)
        fh.write(bytes(64))
    assert "base" in json.loads(sh(["dvc", "status", "--json"], repo).stdout)
    plan = sh([sys.executable, "-m", "pipeline", "plan"], repo).stdout
    assert "cached" not in plan.split("mag50")[0]


def test_same_stage_twice_at_once_waits_instead_of_failing(tmp_path, tiny_model):
    from tasks.dvc_stage import repro

    repo = make_repo(tmp_path / "repo", tiny_model)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, repro("base", str(repo)))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [r.returncode for r in results.values()] == [0, 0], [r.stderr[-800:] for r in results.values()]
    assert sum("Running stage 'base'" in r.stdout for r in results.values()) == 1  # the second found it done


def test_prefect_flow_runs_nodes_as_dvc_stages(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.compare import compare

    repo = make_repo(tmp_path / "repo", tiny_model)
    with prefect_test_harness(server_startup_timeout=120):
        state = compare(repo=str(repo), return_state=True)
        assert state.is_completed(), state
        assert set(state.result()["ran"]) == {"base", "lora_only", "lora_only-merge", "mag50"}
        with get_client(sync_client=True) as client:
            keys = {a.key for a in client.read_artifacts()}
        assert {"compare-orderings", "compare-table"} <= keys
        again = compare(repo=str(repo))
        assert again["ran"] == []  # DVC cache: a second flow run runs nothing
    # Prefect and `dvc repro` share one result: DVC sees everything up to date
    assert ran_stages(sh(["dvc", "repro"], repo).stdout) == set()
    assert os.path.isfile(repo / "dvc.lock")


@pytest.mark.parametrize("module", ["pipeline", "flows.compare", "flows.deploy"])
def test_every_command_has_help(module):
    proc = sh([sys.executable, "-m", module, "--help"], ROOT)
    assert "usage" in proc.stdout.lower() and len(proc.stdout.splitlines()) > 3
