"""Fixtures: a tiny random Llama (dims multiples of 128) and a tiny project dir with its own params.yaml."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def tiny_params(model_dir: Path, *, steps: int = 4) -> dict:
    """A params dict exercising every stage kind on the tiny model, in seconds."""
    return {
        "seed": 0,
        "model": {"source": str(model_dir), "device": "cpu"},
        "data": {
            "calibration": {"files": "data/calib.jsonl", "format": "json", "samples": 4, "seq_len": 64},
            "domain": {"files": "data/domain.txt", "heldout_fraction": 0.2},
            "eval": {"wiki": {"files": "data/wiki.txt"}},
        },
        "evaluate": {"seq_len": 64, "max_tokens": 256, "latency_prompt": 16, "latency_new_tokens": 4, "merge_check_windows": 1},
        "stages": {
            "wanda24": {"kind": "prune", "method": "wanda", "pattern": "2:4"},
            "mag50": {"kind": "prune", "method": "magnitude", "sparsity": 0.5},
            "nf4": {"kind": "quantize", "method": "nf4"},
            "hybrid": {"kind": "peft", "methods": ["lora", "adapter", "prompt"], "steps": steps, "seq_len": 64,
                       "adapter_dim": 16, "prompt_tokens": 4, "lr": 0.005},
            "lora_only": {"kind": "peft", "methods": ["lora"], "steps": steps, "seq_len": 64},
            "merge": {"kind": "merge"},
            "gptq4": {"kind": "ptq", "method": "gptq", "group_size": 128},
        },
        "orderings": {
            "sparse_qlora": ["wanda24", "nf4", "hybrid", "merge"],
            "peft_first": ["hybrid", "merge", "mag50", "gptq4"],
            "lora_only": ["lora_only"],
        },
    }


def write_data(root: Path) -> None:
    """Small slices of the shipped corpora, so the tiny project reads real text through the same loaders."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    shake = (DATA / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    (d / "domain.txt").write_text(shake)
    (d / "wiki.txt").write_text((DATA / "wikitext2-raw-v1" / "wiki.test.raw").read_text()[:30_000])
    lines = (DATA / "c4-en-train-first1000" / "c4_sample.jsonl").read_text().splitlines()[:40]
    (d / "calib.jsonl").write_text("\n".join(lines) + "\n")


def pytest_collection_modifyitems(config, items):
    """The fast set first, the slow integration tests (real DVC, Prefect, subprocesses) after it."""
    # test_distributed last: its flows run in-process against a real server it stops at the end, and Prefect's
    # in-process log / event workers left pointing at that server hang the test harness of later Prefect tests
    items.sort(key=lambda item: (item.get_closest_marker("integration") is not None,
                                 item.module.__name__ == "test_distributed"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from pipeline.models import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny") / "llama"
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    return make_tiny_llama(out, text)


@pytest.fixture
def project(tmp_path, tiny_model, monkeypatch) -> Path:
    """A fresh project dir (cwd) with data/ and params.yaml for the tiny model."""
    write_data(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_project(root: Path, params: dict, nodes: list[str] | None = None) -> tuple:
    """Write a tiny project (data + params) at `root`, run `nodes` (default: the whole plan) in-process from
    inside it; returns (params, {node: metrics})."""
    from pipeline.config import load_params
    from pipeline.plan import build_plan
    from pipeline.runner import run_node

    write_data(root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        loaded = load_params("params.yaml")
        return loaded, {n: run_node(n, loaded) for n in (nodes or build_plan(loaded).nodes)}
    finally:
        mp.undo()


def copy_project_code(dst: Path) -> None:
    for name in ("pipeline", "flows", "tasks"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
