"""The whole default trie at real budgets (params-gpu.yaml) on one GPU, timed per node; then the comparison report,
and the evaluation throughput against a plain HF forward loop at the same batch.

    python bench/gpu_trie.py --params params-gpu.yaml --root runs/gpu --out $OUT --procs 8 --mem-fraction 0.25  # H200
    python bench/gpu_trie.py --params params.yaml --root runs/cpu --nodes base                 # a CPU dry run

--procs auto cuts the trie into root-to-leaf runs (a node's deepest child continues its process, every other child
starts one) and runs them as processes sharing the GPU: a child starts as soon as its parent's artifact is
committed, while the parent is still being evaluated, so only stages lie on the critical path.

Writes <out>/gpu_trie.json (per node: load, stage, eval seconds; the whole trie's wall time; start + imports) and
copies the report (compare.md, compare.json, pareto.png) beside it. Prints a short table last.
"""
from __future__ import annotations

import argparse
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


def runs(plan) -> list[list[str]]:
    """The trie as root-to-leaf runs, each node in one: a node's deepest child continues its run (the critical chain
    stays in one process, with no waiting), every other child starts a run of its own."""
    depth: dict[str, int] = {}
    for name in reversed(list(plan.nodes)):  # depth-first order: children after parents
        depth[name] = 1 + max((depth[c.name] for c in plan.children(name)), default=0)
    out: list[list[str]] = []

    def walk(name: str, run: list[str]) -> None:
        run.append(name)
        kids = sorted((c.name for c in plan.children(name)), key=lambda c: -depth[c])
        if not kids:
            out.append(run)
            return
        walk(kids[0], run)
        for k in kids[1:]:
            walk(k, [])

    walk("base", [])
    return out


def spawn(args, plan) -> list[Path]:
    """Run the trie's runs as processes (see the module docstring): one per run (--procs auto), or dealt round-robin
    in depth-first order to N processes (--procs N; a process runs its runs one after another, and since a run's
    parent always lies in an earlier run, the lowest unfinished run can always proceed). Dealing each run to the
    least-loaded process, shallowest start first, was measured worse on the H200 (24 of 27 nodes at 465 s against 26
    at 459 s: it started five CUDA-graph trainings at once; bench/results/gpu_trie.json). Returns their folders."""
    parts = runs(plan)
    if args.procs != "auto":
        n = int(args.procs)  # checked in main()
        parts = [[node for run in parts[i::n] for node in run] for i in range(min(n, len(parts)))]
    threads = max(1, (os.cpu_count() or 1) // len(parts))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GPTQMODEL_CPU_WORKERS": str(max(2, threads))}
    if args.mem_fraction:  # without MPS each process keeps its own allocator cache: cap it, or one hoards the GPU
        env["GPU_TRIE_MEM_FRACTION"] = str(args.mem_fraction)
    dirs, procs = [], []
    for i, nodes in enumerate(parts):
        d = Path(args.root) / "procs" / f"p{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        log = open(d / "log.txt", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "--params", args.params, "--root", args.root,
                                       "--out", str(d), "--wait", "--nodes", *nodes], stdout=log, stderr=log, env=env))
        dirs.append(d)
        print(f"p{i:02d}: {' '.join(nodes)}", flush=True)
    failed = [(d, p.wait()) for d, p in zip(dirs, procs)]
    for d, rc in failed:
        if rc:
            print(f"{d}: exit {rc}; log tail:\n{(d / 'log.txt').read_text()[-2000:]}", flush=True)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the whole trie of a params file in one process, timed per node.")
    ap.add_argument("--params", default="params-gpu.yaml", help="params file (default: params-gpu.yaml)")
    ap.add_argument("--root", default="runs/gpu", help="where artifacts/, metrics/ and reports/ go (default: runs/gpu)")
    ap.add_argument("--out", default=None, help="folder for gpu_trie.json and the report files")
    ap.add_argument("--nodes", nargs="*", default=None, help="only these nodes (and nothing after them)")
    ap.add_argument("--wait", action="store_true", help="wait for each node's parent (built by another process)")
    ap.add_argument("--finish", nargs="*", default=None, metavar="DIR",
                    help="run no node: merge the per-node timings in DIR/gpu_trie.partial.json of each process, "
                         "then write the report, the throughput check and the HellaSwag anchor")
    ap.add_argument("--no-anchor", action="store_true", help="with --finish: skip the full-HellaSwag anchor of the base")
    ap.add_argument("--procs", default=None, metavar="auto|N",
                    help="auto: one process per root-to-leaf run, sharing the GPU; N: the runs dealt to N processes; "
                         "then finish (report, throughput)")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="with --procs: each process's cap on the GPU's memory (torch.cuda.set_per_process_memory_fraction)")
    args = ap.parse_args()
    if args.procs and args.procs != "auto" and not (args.procs.isdigit() and int(args.procs) > 0):
        ap.error(f"--procs: {args.procs!r} is neither auto nor a positive number of processes; e.g. --procs 8")

    if os.environ.get("GPU_TRIE_MEM_FRACTION") and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(float(os.environ["GPU_TRIE_MEM_FRACTION"]))
    params = load_params(args.params)
    plan = build_plan(params)
    check(params, plan)
    root = Path(args.root)
    out = Path(args.out) if args.out else root
    out.mkdir(parents=True, exist_ok=True)
    t_spawn = time.time()
    if args.procs:  # the children write the per-node rows; this process merges them below
        args.finish = [str(d) for d in spawn(args, plan)]
    nodes = [] if args.finish is not None else (args.nodes or list(plan.nodes))
    rows, t_trie = {}, time.perf_counter()
    for i, name in enumerate(nodes):
        parent = plan.nodes[name].parent
        t_wait = time.perf_counter()
        while args.wait and parent and not (root / "artifacts" / parent / "artifact.json").is_file():
            time.sleep(0.5)  # the parent is built by another process; its artifact appears whole (atomic rename)
        wait_s = time.perf_counter() - t_wait
        t_begin = time.time()
        models.LOAD_SECONDS[0] = 0.0
        sync()
        t0 = time.perf_counter()
        result = run_node(name, params, root, force=True)
        sync()
        wall = time.perf_counter() - t0
        load = models.LOAD_SECONDS[0]
        rows[name] = {"wall_s": round(wall, 2), "start_imports_s": round(T_IMPORTS, 2) if i == 0 else 0.0,
                      "wait_s": round(wait_s, 2), "load_s": round(load, 2), "stage_s": result["stage_seconds"],
                      "eval_s": result["eval_seconds"], "eval_parts_s": result.get("eval_parts_seconds"),
                      "ppl": result["ppl"],
                      "train_tok_s": result.get("train", {}).get("tokens_per_s"), "t_begin": t_begin,
                      "t_end": time.time()}
        print(f"{name}: {wall:.1f} s, ppl {result['ppl']}", flush=True)
        (out / "gpu_trie.partial.json").write_text(json.dumps(rows, indent=1))
    whole = time.perf_counter() - t_trie
    if args.finish is not None:  # several processes ran the branches: the trie's wall time is first start to last end
        for d in args.finish:
            part = Path(d) / "gpu_trie.partial.json"
            if part.is_file():  # a process that failed on its first node left none: its nodes are listed below
                rows.update(json.loads(part.read_text()))
        rows = {n: rows[n] for n in plan.nodes if n in rows}
        # first start to last end; with --procs from the moment the processes were spawned (their starts included)
        whole = max(r["t_end"] for r in rows.values()) - (t_spawn if args.procs else min(r["t_begin"] for r in rows.values()))
    if args.nodes is None:
        t_report = time.perf_counter()
        missing = [n for n in plan.nodes if n not in rows and args.finish is not None]
        if missing:
            print(f"nodes without a result (see procs/*/log.txt): {' '.join(missing)}", flush=True)
        try:
            report.run(params, root)
        except Exception as exc:  # noqa: BLE001  (the timings still get written)
            print(f"report failed: {type(exc).__name__}: {exc}", flush=True)
        report_s = time.perf_counter() - t_report
        for f in ("compare.md", "compare.json", "pareto.png", "train_curves.png"):
            if (root / "reports" / f).is_file():
                shutil.copy(root / "reports" / f, out / f)
    if args.nodes is not None:  # one branch of several processes: the --finish call reports
        return
    throughput = eval_throughput(params, root, params.evaluate.batch_size)
    anchor = None
    if args.nodes is None and params.evaluate.zeroshot and not args.no_anchor:  # the sanity anchor: the base on the full HellaSwag validation set
        from pipeline.zeroshot import evaluate_zeroshot

        t0 = time.perf_counter()
        hs = evaluate_zeroshot(models.load_lm(artifact_path("base", root), params.model), {"hellaswag": None},
                               batch_size=params.evaluate.zeroshot_batch_size, seed=params.seed)["hellaswag"]
        anchor = {"task": "hellaswag", "n": hs["n"], "acc": hs["acc"], "acc_norm": hs["acc_norm"],
                  "seconds": round(time.perf_counter() - t0, 1)}
    result = {"params": args.params, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "start_and_imports_s": round(T_IMPORTS, 2), "whole_trie_s": round(whole, 1),
              "report_s": round(report_s, 1), "missing": missing, "procs": len(args.finish or []) or 1, "nodes": rows, "eval_throughput": throughput, "hellaswag_full_base": anchor}
    (out / "gpu_trie.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'node':40s} {'wall':>7s} {'load':>6s} {'stage':>7s} {'eval':>6s}  ppl")
    for name, r in rows.items():
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in r["ppl"].items() if math.isfinite(v))
        print(f"{name:40s} {r['wall_s']:7.1f} {r['load_s']:6.1f} {r['stage_s']:7.1f} {r['eval_s']:6.1f}  {ppl}")
    print(f"whole trie {whole:.1f} s (+ {T_IMPORTS:.1f} s start + imports); eval {throughput['stage_tok_s']} tok/s vs "
          f"plain {throughput['plain_tok_s']} tok/s at batch {throughput['batch']}: ratio {throughput['ratio']}")
    if anchor:
        print(f"base HellaSwag (full validation, {anchor['n']} items): acc_norm {anchor['acc_norm']:.4f}, acc {anchor['acc']:.4f}")


if __name__ == "__main__":
    main()
