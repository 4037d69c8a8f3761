"""The whole default trie at real budgets (params-gpu.yaml) on one GPU, timed per node; then the comparison report,
and the evaluation throughput against a plain HF forward loop at the same batch.

    python bench/gpu_trie.py --params params-gpu.yaml --root runs/gpu --out $OUT --procs 8 --mem-fraction 0.11  # H200
    python bench/gpu_trie.py --params params.yaml --root runs/cpu --nodes base                 # a CPU dry run

Each node is two jobs, its build and its evaluation; --procs N worker processes share the GPU and each takes the
ready job of the highest priority (the build with the longest chain of builds after it first, evaluations last),
so a node's children start as soon as its artifact is committed, while it is still being evaluated elsewhere, and
only builds lie on the critical path. A job that runs out of memory (the GPU is shared) is given back once and its
worker restarts as a fresh process (a process that ran out may keep its memory fragmented).

Writes <out>/gpu_trie.json (per node: load, stage, eval seconds and when each job ran; the whole trie's wall time
from this process's start; each worker's start + imports) and copies the report (compare.md, compare.json,
pareto.png) beside it. Prints a short table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time

T_START = time.perf_counter()
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import data, models, report  # noqa: E402
from pipeline.checks import check  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.plan import build_plan  # noqa: E402
from pipeline.runner import artifact_path, run_node  # noqa: E402
from pipeline.stages.evaluate import window_nlls  # noqa: E402

T_IMPORTS = time.perf_counter() - T_START


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def eval_throughput(params, root: Path, batch: int) -> dict:
    """Tokens/s of the evaluation's window loop vs a plain HF forward loop (logits + loss) on the same windows and
    batch, on the base node; best of two each, alternating."""
    lm = models.load_lm(artifact_path("base", root), params.model)
    text = next(iter(data.eval_texts(params.data).values()))
    ids = data.tokenize(lm.tokenizer, text, params.evaluate.seq_len * batch * 16)
    wins = data.windows(ids, params.evaluate.seq_len)

    def plain() -> None:
        for i in range(0, len(wins), batch):
            x = wins[i: i + batch].to(lm.device)
            lm.model(input_ids=x, labels=x).loss.item()

    def stage() -> None:
        window_nlls(lm, ids, params.evaluate.seq_len, batch)

    times: dict[str, list[float]] = {"plain": [], "stage": []}
    plain(), stage()  # warm-up
    for _ in range(2):
        for name, fn in (("plain", plain), ("stage", stage)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    tokens = wins.numel()
    tok_s = {k: tokens / min(v) for k, v in times.items()}
    return {"batch": batch, "tokens": tokens, "plain_tok_s": round(tok_s["plain"]), "stage_tok_s": round(tok_s["stage"]),
            "ratio": round(tok_s["stage"] / tok_s["plain"], 3), "runs_s": times}


# A node's build and its evaluation are separate jobs: the children of a node start as soon as its artifact is
# committed, while it is being evaluated, so only builds lie on the critical path. Rough seconds per build kind
# on the H200, only to order the ready jobs (longest remaining chain of builds first, evaluations after).
# A training with prune_during cannot use a CUDA graph: eager, it took 105 s where the graphed ones took 60-100 s
# beside 3 others (stop 8, s4), and as a leaf it was started last and ended the trie alone.
BUILD_GUESS_S = {"base": 5, "prune": 10, "quantize": 15, "peft": 60, "peft_eager": 75, "merge": 10, "ptq": 30}


def build_guess_s(cfg) -> float:
    if cfg is None:
        return BUILD_GUESS_S["base"]
    if cfg.kind == "peft" and (not cfg.cuda_graph or cfg.prune_during is not None):
        return BUILD_GUESS_S["peft_eager"]
    return BUILD_GUESS_S[cfg.kind]


def priorities(params, plan) -> dict[tuple[str, str], float]:
    """(kind, node) -> priority, larger first: a build by the estimated seconds of builds from it to its deepest
    leaf; an evaluation below every build (they never hold up another job)."""
    chain: dict[str, float] = {}
    for name in reversed(list(plan.nodes)):  # depth-first order: children after parents
        cfg = params.stages[plan.nodes[name].config] if plan.nodes[name].config else None
        own = build_guess_s(cfg)
        chain[name] = own + max((chain[c.name] for c in plan.children(name)), default=0)
    order = list(plan.nodes)
    return {**{("build", n): 1e6 + chain[n] for n in plan.nodes},
            **{("eval", n): -order.index(n) for n in plan.nodes}}


class Jobs:
    """The trie's jobs shared by worker processes through files under <root>/procs/claims: a job is taken by
    creating its claim file (O_EXCL: exactly one worker gets it), done when its .done file appears, failed when its
    .failed file does (then every job that needs it fails too)."""

    def __init__(self, params, plan, root: Path, nodes: list[str], max_trainings: int = 0, me: str = ""):
        self.plan, self.root, self.dir, self.me = plan, root, root / "procs" / "claims", me
        self.prio = priorities(params, plan)
        self.nodes = set(nodes)
        self.jobs = sorted(((k, n) for n in nodes for k in ("build", "eval")), key=lambda j: -self.prio[j])
        self.trainings = [("build", n) for n in nodes  # highest priority first, as self.jobs
                          if plan.nodes[n].config and params.stages[plan.nodes[n].config].kind == "peft"]
        self.trainings.sort(key=lambda j: -self.prio[j])
        self.max_trainings = max_trainings

    def may_start(self, job: tuple[str, str]) -> bool:
        """At most max_trainings PEFT builds at once, counting a slot for every not-yet-started training of higher
        priority: trainings share the GPU's throughput, so the critical chain's finishes sooner beside fewer."""
        if not self.max_trainings or job not in self.trainings:
            return True
        running = sum(self._file(j).exists() and not self._file(j, ".done").exists()
                      and not self._file(j, ".failed").exists() for j in self.trainings)
        ahead = self.trainings[:self.trainings.index(job)]
        reserved = sum(not self._file(j).exists() for j in ahead)
        return running + reserved < self.max_trainings

    def _file(self, job: tuple[str, str], suffix: str = "") -> Path:
        return self.dir / f"{job[0]}-{job[1]}{suffix}"

    def needs(self, job: tuple[str, str]) -> tuple[str, str] | None:
        kind, node = job
        if kind == "eval":
            return ("build", node)
        parent = self.plan.nodes[node].parent
        return ("build", parent) if parent else None

    def state(self, job: tuple[str, str]) -> str:
        """done | failed | taken | ready | waiting (for the job it needs)."""
        for suffix, state in ((".done", "done"), (".failed", "failed"), ("", "taken")):
            if self._file(job, suffix).exists():
                return state
        need = self.needs(job)
        if need is None or (need[1] not in self.nodes and
                            (artifact_path(need[1], self.root) / "artifact.json").is_file()):
            return "ready"  # (a parent outside --nodes counts as built if its artifact is there)
        return {"done": "ready", "failed": "failed"}.get(self.state(need), "waiting")

    def take(self) -> tuple[str, str] | None | bool:
        """The ready job of the highest priority, now claimed by this process; None: nothing is ready yet; False:
        nothing is left to take."""
        left = False
        for job in self.jobs:  # first a job this worker gave back after out of memory (its slot was already granted)
            if self.held_for(job) == self.me and self.state(job) == "ready" and self.claim(job):  # (no marker: cheap)
                return job
        for job in self.jobs:
            state = self.state(job)
            if state == "failed" and not self._file(job).exists() and self.claim(job):
                self._file(job, ".failed").touch()  # what it needs failed: nobody will run it
            elif state == "ready" and not self.held_for_another(job) and self.may_start(job) and self.claim(job):
                return job
            left = left or state in ("ready", "waiting")
        return None if left else False

    def claim(self, job: tuple[str, str]) -> bool:
        try:
            os.close(os.open(self._file(job), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def release(self, job: tuple[str, str]) -> bool:
        """Give a taken job back for one more try (its claim removed), held for this worker restarted as a fresh
        process (see held_for_another); False if it had its retry already."""
        try:
            fd = os.open(self._file(job, ".retried"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, self.me.encode())
        os.close(fd)
        self._file(job).unlink()
        return True

    def held_for(self, job: tuple[str, str]) -> str | None:
        """The worker a job given back after running out of memory waits for (RETRY_HOLD_S): the one that released
        it, restarting as a fresh process, which takes it before anything else. In s8 another worker, its memory
        fragmented by the jobs it had run, took the retry and ran out again. After the hold (the restart failed?)
        any worker may take it."""
        marker = self._file(job, ".retried")
        try:
            owner, age = marker.read_text(), time.time() - marker.stat().st_mtime
        except FileNotFoundError:
            return None
        return owner if age < RETRY_HOLD_S else None

    def held_for_another(self, job: tuple[str, str]) -> bool:
        return self.held_for(job) not in (None, self.me)

    def finish(self, job: tuple[str, str], ok: bool) -> None:
        self._file(job, ".done" if ok else ".failed").touch()


RETRY_HOLD_S = 60.0  # how long a job given back after out of memory waits for its restarted worker
T_WORKER_READY = [0.0]  # when this process was ready to take jobs (wall clock)
RESTARTED = "GPU_TRIE_WORKER_RESTARTED"  # set in a worker's environment when it re-executes itself


def work(args, params, plan, root: Path, nodes: list[str], out: Path) -> None:
    """One worker: take the ready job of the highest priority, run it, repeat until none is left. Writes each job's
    timings to <out>/gpu_trie.partial.json as it goes, its start + imports to <out>/ready.txt."""
    partial = out / "gpu_trie.partial.json"
    restarted = os.environ.get(RESTARTED) == "1"  # a worker restarted after running out of memory keeps its first
    if not restarted:                              # start and its rows
        (out / "ready.txt").write_text(json.dumps({"start_imports_s": round(T_IMPORTS, 2), "ready_at": T_WORKER_READY[0]}))
    jobs = Jobs(params, plan, root, nodes, args.max_trainings, me=out.name)
    rows: dict[str, dict] = json.loads(partial.read_text()) if restarted and partial.exists() else {}
    while (job := jobs.take()) is not False:
        if job is None:
            time.sleep(0.2)
            continue
        kind, name = job
        models.LOAD_SECONDS[0] = 0.0
        sync()
        t_begin, t0 = time.time(), time.perf_counter()
        try:
            result = run_node(name, params, root, force=kind == "build", evaluate=kind == "eval")
        except Exception as exc:  # noqa: BLE001  (recorded; the jobs that need it fail, the others go on)
            failure = f"{type(exc).__name__}: {exc}"
            del exc
            # (a worker process only: with --procs 1 the driver itself runs the jobs, and restarting it starts over)
            if args.worker and "out of memory" in failure.lower() and jobs.release(job):
                # Out of memory beside 7 others is a matter of timing, and a process that ran out may keep its
                # memory fragmented (stop 8: one such worker then failed every job it took, in milliseconds). The job
                # goes back for one more try, held for this worker, which starts over as a fresh process.
                rows.setdefault(name, {})[f"{kind}_retried_after"] = failure[:300]
                partial.write_text(json.dumps(rows, indent=1))
                print(f"{kind} {name}: {failure[:200]}; released for one more try, worker restarting", flush=True)
                os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, RESTARTED: "1"})
            jobs.finish(job, ok=False)
            rows.setdefault(name, {})[f"{kind}_error"] = failure
            print(f"{kind} {name}: FAILED {failure}", flush=True)
            partial.write_text(json.dumps(rows, indent=1))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        sync()
        wall = time.perf_counter() - t0
        jobs.finish(job, ok=True)
        row = rows.setdefault(name, {})
        row.update({f"{kind}_proc": out.name, f"{kind}_begin": t_begin, f"{kind}_end": time.time(),
                    f"{kind}_wall_s": round(wall, 2), f"{kind}_load_s": round(models.LOAD_SECONDS[0], 2)})
        if kind == "build":
            stage_info = result.get("stage_info", {})
            row.update({"stage_s": result["timings"]["stage_s"],
                        "stage_parts_s": stage_info.get("seconds"),
                        "train_tok_s": stage_info.get("train", {}).get("tokens_per_s")})
            print(f"build {name}: {wall:.1f} s", flush=True)
        else:
            row.update({"eval_s": result["eval_seconds"], "eval_parts_s": result.get("eval_parts_seconds"),
                        "ppl": result["ppl"]})
            print(f"eval {name}: {wall:.1f} s, ppl {result['ppl']}", flush=True)
        partial.write_text(json.dumps(rows, indent=1))
        del result
        gc.collect()
        if torch.cuda.is_available():  # hand the job's cached blocks back: the next job may need them (memory cap)
            torch.cuda.empty_cache()


def spawn(args, nodes: list[str], check_plan) -> list[Path]:
    """N worker processes sharing the GPU, each running `work`; returns their folders. The plan's checks (~15 s:
    they import GPTQModel) run here while the workers start and convert the base; a failed check stops them."""
    n = int(args.procs)  # checked in main()
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GPTQMODEL_CPU_WORKERS": str(max(2, threads))}
    if args.mem_fraction:  # without MPS each process keeps its own allocator cache: cap it, or one hoards the GPU
        env["GPU_TRIE_MEM_FRACTION"] = str(args.mem_fraction)
    dirs, procs = [], []
    for i in range(n):
        d = Path(args.root) / "procs" / f"p{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        log = open(d / "log.txt", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "--params", args.params, "--root", args.root,
                                       "--out", str(d), "--worker", "--max-trainings", str(args.max_trainings),
                                       "--nodes", *nodes], stdout=log, stderr=log, env=env))
        dirs.append(d)
    try:
        check_plan()
    except BaseException:
        for p in procs:
            p.kill()
        raise
    for d, p in zip(dirs, procs):
        if p.wait():
            print(f"{d}: exit {p.returncode}; log tail:\n{(d / 'log.txt').read_text()[-2000:]}", flush=True)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the whole trie of a params file (builds and evaluations as jobs, in "
                                             "one process or several sharing the GPU), timed per node.")
    ap.add_argument("--params", default="params-gpu.yaml", help="params file (default: params-gpu.yaml)")
    ap.add_argument("--root", default="runs/gpu", help="where artifacts/, metrics/ and reports/ go (default: runs/gpu)")
    ap.add_argument("--out", default=None, help="folder for gpu_trie.json and the report files")
    ap.add_argument("--nodes", nargs="*", default=None,
                    help="only these nodes (each one's parent among them or already built under --root)")
    ap.add_argument("--procs", default="1", metavar="N", help="worker processes sharing the GPU (default 1: this one)")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="with --procs: each process's cap on the GPU's memory (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--max-trainings", type=int, default=4,
                    help="PEFT builds at once, slots kept for the higher-priority ones (0: no limit; default 4)")
    ap.add_argument("--no-anchor", action="store_true", help="skip the full-HellaSwag anchor of the base")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process spawned by --procs N
    args = ap.parse_args()
    if not (args.procs.isdigit() and int(args.procs) > 0):
        ap.error(f"--procs: {args.procs!r} is not a positive number of processes; e.g. --procs 8")

    if os.environ.get("GPU_TRIE_MEM_FRACTION") and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(float(os.environ["GPU_TRIE_MEM_FRACTION"]))
    params = load_params(args.params)
    plan = build_plan(params)
    root = Path(args.root)
    out = Path(args.out) if args.out else root
    out.mkdir(parents=True, exist_ok=True)
    nodes = args.nodes or list(plan.nodes)
    for name in nodes:
        if name not in plan.nodes:
            ap.error(f"--nodes: no node {name!r} in {args.params}; `python -m pipeline plan -p {args.params}` lists them")
        parent = plan.nodes[name].parent
        if parent and parent not in nodes and not (artifact_path(parent, root) / "artifact.json").is_file():
            ap.error(f"--nodes: {name}'s parent {parent} is neither listed nor built under {root}; add it")
    if args.worker:
        T_WORKER_READY[0] = time.time()
        work(args, params, plan, root, nodes, out)
        return
    shutil.rmtree(root / "procs", ignore_errors=True)  # claims of an earlier run
    (root / "procs" / "claims").mkdir(parents=True)
    t_start = time.time() - (time.perf_counter() - T_START)  # this process's own start: imports included
    if int(args.procs) == 1:
        check(params, plan)
        T_WORKER_READY[0] = time.time()
        work(args, params, plan, root, nodes, out)
        dirs = [out]
    else:
        dirs = spawn(args, nodes, lambda: check(params, plan))
    rows: dict[str, dict] = {}
    starts = {}
    for d in dirs:  # a worker's rows (a node's build and its evaluation may come from two workers)
        part = Path(d) / "gpu_trie.partial.json"
        if part.is_file():
            for name, row in json.loads(part.read_text()).items():
                rows.setdefault(name, {}).update(row)
        ready = Path(d) / "ready.txt"
        if ready.is_file():
            starts[Path(d).name] = json.loads(ready.read_text())
    rows = {n: rows[n] for n in plan.nodes if n in rows}
    for name, r in rows.items():  # the per-node breakdown: start + imports of the process that built it
        r["start_imports_s"] = starts.get(r.get("build_proc"), {}).get("start_imports_s")
    ends = [r[k] for r in rows.values() for k in ("build_end", "eval_end") if k in r]
    whole = (max(ends) - t_start) if ends else float("nan")  # from this process's start to the last job's end
    missing = [n for n in nodes if "eval_s" not in rows.get(n, {})]
    if missing:
        print(f"nodes without a result (see procs/*/log.txt): {' '.join(missing)}", flush=True)
    report_s, throughput, anchor = None, None, None
    if args.nodes is None:
        t_report = time.perf_counter()
        try:
            report.run(params, root)
        except Exception as exc:  # noqa: BLE001  (the timings still get written)
            print(f"report failed: {type(exc).__name__}: {exc}", flush=True)
        report_s = round(time.perf_counter() - t_report, 1)
        for f in ("compare.md", "compare.json", "pareto.png", "train_curves.png"):
            if (root / "reports" / f).is_file():
                shutil.copy(root / "reports" / f, out / f)
        throughput = eval_throughput(params, root, params.evaluate.batch_size)
        if params.evaluate.zeroshot and not args.no_anchor:  # the sanity anchor: the base on the full HellaSwag set
            from pipeline.zeroshot import evaluate_zeroshot

            t0 = time.perf_counter()
            hs = evaluate_zeroshot(models.load_lm(artifact_path("base", root), params.model), {"hellaswag": None},
                                   batch_size=params.evaluate.zeroshot_batch_size, seed=params.seed)["hellaswag"]
            anchor = {"task": "hellaswag", "n": hs["n"], "acc": hs["acc"], "acc_norm": hs["acc_norm"],
                      "seconds": round(time.perf_counter() - t0, 1)}
    result = {"params": args.params, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "procs": int(args.procs), "workers": starts,
              "whole_trie_s": round(whole, 1), "report_s": report_s, "missing": missing, "nodes": rows,
              "eval_throughput": throughput, "hellaswag_full_base": anchor}
    (out / "gpu_trie.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'node':34s} {'build':>6s} {'load':>5s} {'stage':>6s} {'eval':>6s} {'done at':>7s}  ppl")
    for name, r in rows.items():
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in r.get("ppl", {}).items() if math.isfinite(v))
        done = max(r.get("build_end", 0), r.get("eval_end", 0)) - t_start
        print(f"{name:34s} {r.get('build_wall_s', float('nan')):6.1f} {r.get('build_load_s', float('nan')):5.1f} "
              f"{r.get('stage_s', float('nan')):6.1f} {r.get('eval_s', float('nan')):6.1f} {done:7.1f}  {ppl}")
    print(f"whole trie {whole:.1f} s from start (imports included), {len(rows) - len(missing)} of {len(nodes)} nodes")
    if throughput:
        print(f"eval {throughput['stage_tok_s']} tok/s vs plain {throughput['plain_tok_s']} tok/s at batch "
              f"{throughput['batch']}: ratio {throughput['ratio']}")
    if anchor:
        print(f"base HellaSwag (full validation, {anchor['n']} items): acc_norm {anchor['acc_norm']:.4f}, acc {anchor['acc']:.4f}")


if __name__ == "__main__":
    main()
