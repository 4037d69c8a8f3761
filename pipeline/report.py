"""The comparison: a table (markdown + DVC metrics json), a Pareto plot of quality vs bytes, and ordering advice."""
from __future__ import annotations

import json
from pathlib import Path

from .config import Params
from .plan import build_plan
from .runner import metrics_fingerprint, metrics_path

REPORTS = Path("reports")


class StaleMetrics(ValueError):
    """Metrics computed under other params than the current ones: a report would mix settings."""


def load_rows(params: Params, root: Path = Path(".")) -> list[dict]:
    """Every node's metrics, refusing missing ones and ones that do not match the current params."""
    plan = build_plan(params)
    rows, stale = [], []
    for name, node in plan.nodes.items():
        path = metrics_path(name, root)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run its node first (dvc repro, or python -m pipeline run {name})")
        row = json.loads(path.read_text())
        if row.get("fingerprint") != metrics_fingerprint(params, node):
            stale.append(name)
        rows.append(row)
    if stale:
        raise StaleMetrics(f"metrics of {len(stale)} node(s) do not match the current params or inputs "
                           f"({', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}); rerun them: dvc repro")
    return rows


def pareto(rows: list[dict], corpus: str) -> list[str]:
    """Nodes no other node beats on both bytes and perplexity on `corpus`."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r["size"]["bytes"], r["ppl"][corpus])):
        if r["ppl"][corpus] < best:
            front.append(r["node"])
            best = r["ppl"][corpus]
    return front


def _mb(b: int) -> str:
    return f"{b / 2**20:.1f}"


def table(rows: list[dict], corpora: list[str], leaves: dict[str, str]) -> str:
    leaf_of = {}
    for o, n in leaves.items():
        leaf_of.setdefault(n, []).append(o)
    base = rows[0]
    head = (["node", "ordering (leaf)", "state"] + [f"ppl {c}" for c in corpora] +
            ["Δ domain ppl vs base", "params", "PEFT params", "sparsity", "bits/w", "MB deploy", "MB stored",
             "prefill tok/s", "decode tok/s", "peak MB", "stage s", "notes"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        notes = list(r.get("flags", []))
        if "merge_error" in r:
            m = r["merge_error"]
            notes.append(f"merge error on {m['windows']}x{m['seq_len']} tokens: max|Δlogit| {m['max_abs_logit_diff']:.3g}, "
                         f"ppl {m['ppl_unmerged']:.2f}→{m['ppl_merged']:.2f}")
        if "train" in r:
            t = r["train"]
            notes.append(f"train loss {t['loss_first']:.2f}→{t['loss_last']:.2f}, {t['tokens_per_s']:.0f} tok/s")
        d = r["ppl"]["domain_heldout"] - base["ppl"]["domain_heldout"]
        cells = ([f"`{r['node']}`", ", ".join(leaf_of.get(r["node"], [])) or "", r["state"]] +
                 [f"{r['ppl'][c]:.2f}" for c in corpora] +
                 [f"{d:+.2f}", f"{r['params']['total'] / 1e6:.1f}M", f"{r['params']['peft']:,}", f"{r['params']['sparsity']:.1%}",
                  f"{r['size']['bits_per_weight']:.2f}", _mb(r["size"]["bytes"]), _mb(r["size"]["own_bytes"]),
                  f"{r['latency']['prefill_tok_s']:.0f}", f"{r['latency']['decode_tok_s']:.1f}",
                  f"{r['peak_memory_mb']['stage+eval']:.0f}", f"{r['stage_seconds']:.0f}", "; ".join(notes)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def advice(rows: list[dict], leaves: dict[str, str]) -> list[str]:
    by = {r["node"]: r for r in rows}
    out = []
    ranked = sorted(leaves.items(), key=lambda kv: by[kv[1]]["ppl"]["domain_heldout"])
    best_o, best_n = ranked[0]
    out.append(f"Best domain perplexity: **{best_o}** (`{best_n}`, {by[best_n]['ppl']['domain_heldout']:.2f}, "
               f"{_mb(by[best_n]['size']['bytes'])} MB).")
    smallest_o, smallest_n = min(leaves.items(), key=lambda kv: (by[kv[1]]["size"]["bytes"], by[kv[1]]["ppl"]["domain_heldout"]))
    out.append(f"Smallest deployable: **{smallest_o}** (`{smallest_n}`, {_mb(by[smallest_n]['size']['bytes'])} MB, "
               f"domain ppl {by[smallest_n]['ppl']['domain_heldout']:.2f}).")
    front = pareto(rows, "domain_heldout")
    out.append("Pareto-optimal (bytes vs domain ppl): " + ", ".join(f"`{n}`" for n in front) + ".")
    flagged = [r["node"] for r in rows if r.get("flags")]
    if flagged:
        out.append("Flagged orders: " + ", ".join(f"`{n}` ({'; '.join(by[n]['flags'])})" for n in flagged) + ".")
    return out


def _spread_labels(points: list[tuple], gap: float) -> list[tuple]:
    """Label y positions at least `gap` apart among points of similar size, so that labels do not overlap."""
    xs = [p[0] for p in points]
    width = (max(xs) - min(xs)) * 0.05 or 1.0
    clusters: list[list[tuple]] = []
    for p in sorted(points, key=lambda p: p[0]):
        if clusters and p[0] - clusters[-1][0][0] <= width:
            clusters[-1].append(p)
        else:
            clusters.append([p])
    out = []
    for cluster in clusters:
        last = -float("inf")
        for x, y, label, kind in sorted(cluster, key=lambda p: p[1]):
            last = max(y, last + gap)
            out.append((x, y, label, kind, last))
    return out


def plot(rows: list[dict], corpora: list[str], leaves: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    leaf_nodes = set(leaves.values())
    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 6), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        front = set(pareto(rows, corpus))
        points = []
        for r in rows:
            x, y = r["size"]["bytes"] / 2**20, r["ppl"][corpus]
            kind = "base" if r["node"] == "base" else ("leaf" if r["node"] in leaf_nodes else "intermediate")
            style = {"base": ("k", "*", 160), "leaf": ("tab:red", "o", 60), "intermediate": ("tab:blue", ".", 40)}[kind]
            ax.scatter(x, y, c=style[0], marker=style[1], s=style[2], zorder=3,
                       edgecolors="gold" if r["node"] in front else "none", linewidths=1.5)
            label = r["node"] if kind != "leaf" else f"{r['node']} ({', '.join(o for o, n in leaves.items() if n == r['node'])})"
            points.append((x, y, label, kind))
        ys = [p[1] for p in points]
        for x, y, label, kind, ty in _spread_labels(points, gap=(max(ys) - min(ys)) * 0.04 or 1.0):
            ax.annotate(label, (x, y), xytext=(x + 8, ty), fontsize=6.5, va="center",
                        color="black" if kind != "intermediate" else "dimgray",
                        arrowprops={"arrowstyle": "-", "color": "lightgray", "lw": 0.6})
        pts = sorted((r["size"]["bytes"] / 2**20, r["ppl"][corpus]) for r in rows if r["node"] in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", c="gold", zorder=2, label="Pareto front")
        ax.set_xlabel("bytes to deploy (MB)")
        ax.set_xlim(right=ax.get_xlim()[1] + 0.35 * (ax.get_xlim()[1] - ax.get_xlim()[0]))  # room for labels
        ax.set_ylabel(f"perplexity, {corpus} (lower is better)")
        ax.set_title(f"{corpus}: quality vs size (★ base, ● ordering leaf, · intermediate)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(params: Params, root: Path = Path(".")) -> dict:
    plan = build_plan(params)
    rows = load_rows(params, root)
    corpora = list(rows[0]["ppl"])
    out = root / REPORTS
    out.mkdir(parents=True, exist_ok=True)
    ev = rows[0]["eval"]
    tokens = ", ".join(f"{c}: {n:,} tokens" for c, n in ev["tokens"].items())
    md = ["# Compression orderings compared", "",
          f"Perplexity: non-overlapping windows of {ev['seq_len']} tokens ({tokens}; remainder dropped). "
          "`MB deploy` = base weights + PEFT files needed to serve the node; `MB stored` = what its artifact itself holds "
          "(adapter-only nodes reference their parent's weights).", "",
          *[f"- {line}" for line in advice(rows, plan.leaves)], "",
          table(rows, corpora, plan.leaves), "", "![Pareto plot](pareto.png)", ""]
    (out / "compare.md").write_text("\n".join(md))
    summary = {r["node"]: {**{f"ppl_{c}": r["ppl"][c] for c in corpora}, "mb": round(r["size"]["bytes"] / 2**20, 2),
                           "bits_per_weight": r["size"]["bits_per_weight"], "sparsity": r["params"]["sparsity"],
                           "decode_tok_s": r["latency"]["decode_tok_s"]} for r in rows}
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, corpora, plan.leaves, out / "pareto.png")
    return {"rows": rows, "markdown": "\n".join(md), "summary": summary}
