"""Integration: the comparison on a 2-worker Dask cluster whose workers share no directory, artifacts exchanged
through a DVC remote on a local S3 server (moto, 127.0.0.1); sweeps with DVC experiments; a deployment on a process
work pool fired by its cron schedule; a failing node. One real Prefect server and one S3 server for the module."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_project
from test_dvc_prefect import make_repo, ran_stages, sh

pytestmark = pytest.mark.integration
BUCKET = "dvc-store"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server in its own process group, so that stopping it by its id also stops the processes it started."""
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A real Prefect server and an S3 server on free local ports; the environment points this process, its
    subprocesses and Dask workers at them (restored afterwards)."""
    tmp = tmp_path_factory.mktemp("services")
    env = {"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": "", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    s3_port, api_port = free_port(), free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{api_port}/api"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3 = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], tmp / "s3.log")
    api = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(api_port)], tmp / "prefect.log")
    procs = [s3, api]
    try:
        endpoint = f"http://127.0.0.1:{s3_port}"
        wait_http(endpoint, s3)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        wait_http(f"{env['PREFECT_API_URL']}/health", api)
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"]}):
            yield {"endpoint": endpoint, "api": env["PREFECT_API_URL"], "tmp": tmp, "procs": procs}
    finally:
        for p in procs:
            stop(p)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def add_remote(repo: Path, endpoint: str, prefix: str) -> None:
    sh(["dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/{prefix}"], repo)
    sh(["dvc", "remote", "modify", "store", "endpointurl", endpoint], repo)
    sh(["git", "commit", "-qam", "DVC remote"], repo)


def commit_all(repo: Path, msg: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", msg], repo)


@pytest.fixture(scope="module")
def distributed(services, tiny_model, tmp_path_factory):
    """The tiny trie on a local Dask cluster of 2 workers (each its own scratch dir, checkout and DVC cache), each
    node claiming one (pretend) GPU, artifacts through S3; then the driver's result committed."""
    from flows.compare import compare

    tmp = tmp_path_factory.mktemp("dist")
    driver = make_repo(tmp / "driver", tiny_model)
    add_remote(driver, services["endpoint"], "dist")
    t0 = time.perf_counter()
    state = compare(repo=str(driver), engine="dask", workers=2, gpus_per_node=1, return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_completed(), state.message
    commit_all(driver, "distributed run")
    params = yaml.safe_load((driver / "params.yaml").read_text())
    return {"driver": driver, "result": state.result(), "wall": wall, "tmp": tmp, "params": params}


def test_distributed_run_uses_both_workers_and_matches_serial(distributed):
    res, driver = distributed["result"], distributed["driver"]
    assert sorted(res["ran"]) == ["base", "lora_only", "lora_only-merge", "mag50"]
    assert len(set(res["workers"].values())) == 2, res["workers"]  # nodes landed on both workers
    assert set(res["gpus"].values()) == {"0", "1"}, res["gpus"]  # each worker's own GPU, claimed per node
    assert (driver / "reports" / "compare.md").is_file() and not (driver / "artifacts").exists()
    _, serial = run_project(distributed["tmp"] / "serial", distributed["params"])  # the nodes one after another
    for node, ref in serial.items():
        got = json.loads((driver / "metrics" / f"{node}.json").read_text())
        assert got["params"] == ref["params"], node
        # a PEFT adapter's config records its base model's path: the byte count varies with the directory's name
        assert abs(got["size"]["bytes"] - ref["size"]["bytes"]) < 1024, (node, got["size"], ref["size"])
        for corpus, ppl in ref["ppl"].items():
            assert math.isclose(got["ppl"][corpus], ppl, rel_tol=1e-4), (node, corpus, got["ppl"], ref["ppl"])
    print(f"distributed tiny trie: {distributed['wall']:.1f} s wall; ppl", {n: r["ppl"] for n, r in serial.items()})


@pytest.fixture(scope="module")
def clone(distributed):
    """A fresh clone of the driver's commit with its data pulled from S3."""
    dst = distributed["tmp"] / "clone"
    sh(["git", "clone", "-q", str(distributed["driver"]), str(dst)], distributed["tmp"])
    sh(["git", "config", "user.email", "ci@example.com"], dst)
    sh(["git", "config", "user.name", "ci"], dst)
    sh(["dvc", "pull"], dst)
    return dst


def test_fresh_clone_pull_then_repro_runs_nothing(clone):
    assert ran_stages(sh(["dvc", "repro"], clone).stdout) == set()
    assert json.loads(sh(["dvc", "status", "--json"], clone).stdout or "{}") == {}


def wait_queue(repo: Path, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sh(["dvc", "queue", "status"], repo).stdout
        if not any(s in out for s in ("Queued", "Running")):
            return out
        time.sleep(4)
    raise TimeoutError(out)


def test_sweep_with_queued_dvc_experiments_reruns_only_the_subtree(clone):
    # the README's sweep, two values: queued, run two at a time, compared
    for v in ("0.3", "0.7"):
        sh(["dvc", "exp", "run", "--queue", "-S", f"stages.mag50.sparsity={v}", "-n", f"sparsity-{v}"], clone)
    sh(["dvc", "queue", "start", "-j", "2"], clone)
    status = wait_queue(clone)
    assert status.count("Success") == 2, status
    for v in ("0.3", "0.7"):  # only the node under the changed stage config, and the report, ran
        assert ran_stages(sh(["dvc", "queue", "logs", f"sparsity-{v}"], clone).stdout) == {"mag50", "report"}
    rows = json.loads(sh(["dvc", "exp", "show", "--json"], clone).stdout)
    shown = {rev["name"]: rev for row in rows for exp in row.get("experiments") or [] for rev in exp["revs"]}
    assert {"sparsity-0.3", "sparsity-0.7"} <= set(shown), list(shown)
    nonzero = {}
    for v in ("0.3", "0.7"):
        diff = json.loads(sh(["dvc", "metrics", "diff", "HEAD", f"sparsity-{v}", "--json"], clone).stdout)
        assert set(diff.get("diff", diff)) >= {"metrics/mag50.json", "reports/compare.json"}, diff
        assert not any(f"metrics/{n}.json" in diff.get("diff", diff) for n in ("base", "lora_only", "lora_only-merge"))
        nonzero[v] = shown[f"sparsity-{v}"]["data"]["metrics"]["metrics/mag50.json"]["data"]["params"]["nonzero"]
    assert nonzero["0.3"] > nonzero["0.7"]
    plots = sh(["dvc", "plots", "diff", "HEAD", "sparsity-0.7", "--json"], clone)
    if "plots" in (clone / "dvc.yaml").read_text():  # declared by pipeline/dvcgen.py: the Pareto plot + per-node table
        assert json.loads(plots.stdout), plots.stdout


def test_deployment_on_a_process_work_pool_runs_on_its_cron_schedule(services, clone):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    fire = datetime.now(timezone.utc) + timedelta(seconds=25)  # a 6-field cron (seconds last): fires once, soon
    cron = f"{fire.minute} {fire.hour} {fire.day} {fire.month} * {fire.second}"
    sh([sys.executable, "-m", "flows.deploy", "--pool", "test-pool", "--name", "scheduled", "--cron", cron,
        "--repo", str(clone), "--orderings", "pruned"], ROOT)
    worker = start(["prefect", "worker", "start", "--pool", "test-pool", "--type", "process"],
                   services["tmp"] / "worker.log")
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("compare-orderings/scheduled")
            assert dep.parameters["orderings"] == ["pruned"] and dep.work_pool_name == "test-pool"
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [dep.id]}))
                if runs and runs[0].state.is_final():
                    break
                time.sleep(3)
            assert runs and runs[0].state.is_completed(), (runs, (services["tmp"] / "worker.log").read_text()[-3000:])
            assert runs[0].auto_scheduled  # created by the schedule, not by hand
            keys = {a.key for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}))}
            assert {"compare-orderings", "compare-table"} <= keys
    finally:
        stop(worker)


def test_failed_node_fails_the_run_keeps_siblings_and_a_rerun_resumes(clone):
    from flows.compare import compare
    from tasks.dvc_lock import read_entries

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["stages"].update({"wanda_bad": {"kind": "prune", "method": "wanda", "sparsity": 0.5},
                             "mag30": {"kind": "prune", "method": "magnitude", "sparsity": 0.3}})
    params["orderings"].update({"broken": ["wanda_bad"], "pruned30": ["mag30"]})
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh([sys.executable, "-m", "pipeline", "dvc-yaml"], clone)
    calib = clone / "data" / "calib.jsonl"
    good = calib.read_text()
    calib.write_text(good + '{"text": "cut short\n')  # the first record is fine (plan checks pass); the stage fails
    subset = ["broken", "pruned30"]
    state = compare(repo=str(clone), orderings=subset, return_state=True)
    assert state.is_failed()
    err = str(state.result(raise_on_failure=False))
    assert "1 of 3 nodes failed" in err and "wanda_bad: StageFailed" in err and "log tail" in err, err
    assert "mag30" in read_entries(clone) and (clone / "metrics" / "mag30.json").is_file()  # the sibling finished
    calib.write_text(good)
    again = compare(repo=str(clone), orderings=subset)
    assert again["ran"] == ["wanda_bad"]  # base and mag30 from the DVC cache
