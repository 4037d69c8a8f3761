"""The H200 trie's job queue (bench/gpu_trie.py): claims, priorities, the one retry after running out of memory."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_trie  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.plan import build_plan  # noqa: E402


def _jobs(tmp_path: Path, max_trainings: int = 4, me: str = "p00") -> "gpu_trie.Jobs":
    params = load_params(ROOT / "params-gpu.yaml")
    plan = build_plan(params)
    (tmp_path / "procs" / "claims").mkdir(parents=True, exist_ok=True)
    return gpu_trie.Jobs(params, plan, tmp_path, list(plan.nodes), max_trainings, me=me)


def test_a_job_released_after_out_of_memory_is_retried_once_by_its_fresh_worker(tmp_path):
    jobs, other = _jobs(tmp_path), _jobs(tmp_path, me="p01")
    first = jobs.take()
    assert first == ("build", "base") and jobs.state(first) == "taken"
    assert jobs.take() is None  # everything else needs the base
    assert jobs.release(first) and jobs.state(first) == "ready"
    assert other.take() is None  # held for the worker that released it (restarting as a fresh process)
    assert jobs.take() == first  # taken again by that worker
    assert not jobs.release(first)  # its one retry is spent: the caller records the failure
    jobs.finish(first, ok=False)
    assert jobs.state(("build", "wanda50")) == "failed" and jobs.state(("eval", "base")) == "failed"


def test_the_eager_training_starts_in_the_first_wave(tmp_path):
    jobs = _jobs(tmp_path)
    jobs.finish(jobs.take(), ok=True)  # the base
    taken = []
    while (job := jobs.take()) not in (None, False):
        taken.append(job)
    trainings = [n for k, n in taken if n in {t[1] for t in jobs.trainings}]
    assert len(trainings) == 2  # at most 4 at once, 2 slots kept for nf4-hybrid and wanda50-nf4-hybrid
    assert "hybrid_pdp50" in trainings  # prune_during trains eagerly: longer, so not left for last


def test_a_held_retry_goes_to_any_worker_once_its_hold_is_over(tmp_path, monkeypatch):
    jobs, other = _jobs(tmp_path), _jobs(tmp_path, me="p01")
    first = jobs.take()
    assert jobs.release(first)
    monkeypatch.setattr(gpu_trie, "RETRY_HOLD_S", 0.0)  # the released worker did not come back in time
    assert other.take() == first


def test_a_restarted_worker_takes_its_released_job_before_any_other(tmp_path):
    jobs, other = _jobs(tmp_path), _jobs(tmp_path, me="p01")
    jobs.finish(jobs.take(), ok=True)  # the base: now its children's builds, of higher priority, are ready
    evaluation = ("eval", "base")  # the lowest priority of all
    assert jobs.claim(evaluation) and jobs.release(evaluation)
    assert other.take() != evaluation  # held for p00
    assert jobs.take() == evaluation  # p00, restarted, takes it back before the builds
