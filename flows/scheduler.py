"""Run a trie of nodes on any Prefect task runner: a node is submitted once its parent has finished, siblings run at
once, and a failure stops only its own subtree.

The driver submits a node only when its inputs exist, rather than handing the engine futures to wait on: a waiting
task would hold its cluster slot (and its GPU claim) doing nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from prefect.futures import PrefectFuture, as_completed

from pipeline.plan import Plan


@dataclass
class Outcome:
    results: dict[str, dict] = field(default_factory=dict)  # node -> its task's result
    failed: dict[str, str] = field(default_factory=dict)  # node -> its error (names the stage, ends in its log tail)
    skipped: dict[str, str] = field(default_factory=dict)  # node -> the failed ancestor it waited for


def run_trie(plan: Plan, nodes: list[str], submit: Callable[[str, dict[str, dict]], PrefectFuture],
             done: dict[str, dict] | None = None,
             on_result: Callable[[str, dict], None] | None = None) -> Outcome:
    """Run `nodes` (topological order) that are not already `done`; `submit(node, results_so_far)` starts one."""
    out = Outcome(results=dict(done or {}))
    waiting = [n for n in nodes if n not in out.results]
    pending: dict[PrefectFuture, str] = {}
    while waiting or pending:
        for n in list(waiting):
            parent = plan.nodes[n].parent
            if parent in out.failed or parent in out.skipped:
                out.skipped[n] = out.skipped.get(parent, parent)
                waiting.remove(n)
            elif parent is None or parent in out.results:
                pending[submit(n, out.results)] = n
                waiting.remove(n)
        if not pending:
            break
        future = next(as_completed(list(pending)))
        node = pending.pop(future)
        value = future.result(raise_on_failure=False)
        if isinstance(value, BaseException):
            out.failed[node] = f"{type(value).__name__}: {value}"
        else:
            out.results[node] = value
            if on_result:
                on_result(node, value)
    return out
