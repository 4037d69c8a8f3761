"""The comparison: a table (markdown + DVC metrics json), a Pareto plot of quality vs bytes, and ordering advice."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from . import artifact, stats
from .config import Params
from .plan import build_plan
from .runner import metrics_fingerprint, metrics_path
from .stages.evaluate import main_items, main_metric

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
    for r in sorted(rows, key=lambda r: (r["size"]["bytes"], r["ppl"][corpus])):  # point estimates; the table has intervals
        if r["ppl"][corpus] < best:
            front.append(r["node"])
            best = r["ppl"][corpus]
    return front


def _mb(b: int) -> str:
    return f"{b / 2**20:.1f}"


DOMAIN = "domain_heldout"


def tasks_of(rows: list[dict]) -> list[str]:
    return list(rows[0].get("zeroshot", {}))


def diff(a: dict, b: dict, what: str) -> stats.Interval:
    """b minus a on the same windows (perplexity on a corpus) or items (accuracy on a task 'acc:<task>')."""
    if what.startswith("acc:"):
        t = what[4:]
        return stats.paired_mean_diff(main_items(a["zeroshot"][t]), main_items(b["zeroshot"][t]))
    return stats.paired_ppl_diff(a["nll_per_window"][what], b["nll_per_window"][what])


def fmt_diff(d: stats.Interval, digits: int = 2, pct: bool = False) -> str:
    """'+1.23 [+0.40, +2.10]' with a * when the paired 95% interval excludes 0, else 'n.s.'."""
    f = (lambda x: f"{100 * x:+.{digits - 1}f}") if pct else (lambda x: f"{x:+.{digits}f}")
    return f"{f(d.estimate)} [{f(d.lo)}, {f(d.hi)}]" + (" *" if d.significant else " n.s.")


def _ci(value: float, ci: list[float] | None, digits: int = 2, pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.{digits}f}")
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]" if ci else f(value)


def loads_with(r: dict) -> str:
    """The libraries that load a node at its reported quality (metrics written before the field: '?')."""
    return " + ".join(r["loads_with"]) if "loads_with" in r else "?"


def _seed_ppls(r: dict, corpus: str) -> list[float]:
    return [r["ppl"][corpus]] + [s["ppl"][corpus] for s in r.get("seeds", {}).values()]


def _mean_sd(values: list[float], digits: int = 2) -> str:
    mean, sd = stats.spread(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _seed_note(r: dict) -> str | None:
    if "seeds" not in r:
        return None
    values = _seed_ppls(r, DOMAIN)
    return f"domain ppl over {len(values)} seeds {_mean_sd(values)} (sd)"


def table(rows: list[dict], corpora: list[str], leaves: dict[str, str]) -> str:
    leaf_of: dict[str, list[str]] = {}
    for o, n in leaves.items():
        leaf_of.setdefault(n, []).append(o)
    by = {r["node"]: r for r in rows}
    base = rows[0]
    tasks = tasks_of(rows)
    head = (["node", "ordering (leaf)", "state", "loads with"] + [f"ppl {c} [95% CI]" for c in corpora] +
            ["Δ domain ppl vs parent", "Δ domain ppl vs base"] + [f"acc {t} % [95% CI]" for t in tasks] +
            ["params", "PEFT params", "sparsity", "bits/w", "MB deploy", "MB bitmask est.", "MB stored",
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
        if _seed_note(r):
            notes.append(_seed_note(r))
        parent = by.get("-".join(r["chain"][:-1]) or "base") if r["chain"] else None
        acc = []
        for t in tasks:
            z = r["zeroshot"][t]
            acc.append(_ci(z[main_metric(z)], z.get("ci95"), pct=True))
        cells = ([f"`{r['node']}`", ", ".join(leaf_of.get(r["node"], [])) or "", r["state"], loads_with(r)] +
                 [_ci(r["ppl"][c], r.get("ppl_ci95", {}).get(c)) for c in corpora] +
                 [fmt_diff(diff(parent, r, DOMAIN)) if parent else "", fmt_diff(diff(base, r, DOMAIN)) if parent else ""] +
                 acc +
                 [f"{r['params']['total'] / 1e6:.1f}M", f"{r['params']['peft']:,}", f"{r['params']['sparsity']:.1%}",
                  f"{r['size']['bits_per_weight']:.2f}", _mb(r["size"]["bytes"]),
                  _mb(r["size"]["bitmask_bytes_est"]) if r["size"].get("bitmask_bytes_est") else "—", _mb(r["size"]["own_bytes"]),
                  f"{r['latency']['prefill_tok_s']:.0f}", f"{r['latency']['decode_tok_s']:.1f}",
                  f"{r['peak_memory_mb']['stage+eval']:.0f}", f"{r['stage_seconds']:.0f}", "; ".join(notes)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winner(rows: list[dict], candidates: list[str], what: str, label: str) -> str:
    """Name the best candidate on `what` only if it is significantly better than every other; else say who is tied."""
    by = {r["node"]: r for r in rows}
    higher_better = what.startswith("acc:")

    def value(n: str) -> float:
        if higher_better:
            z = by[n]["zeroshot"][what[4:]]
            return z[main_metric(z)]
        return by[n]["ppl"][what]

    ranked = sorted(dict.fromkeys(candidates), key=value, reverse=higher_better)  # not set(): its order varies by run
    best = ranked[0]
    tied = [n for n in ranked[1:] if not diff(by[best], by[n], what).significant]
    unit = (lambda n: f"{100 * value(n):.1f}%") if higher_better else (lambda n: f"{value(n):.2f}")
    if not tied:
        if len(ranked) == 1:
            return f"{label}: only `{best}` ({unit(best)})."
        closest = ranked[1]
        d = diff(by[best], by[closest], what)
        return (f"{label}: **`{best}`** ({unit(best)}), significantly better than every other candidate "
                f"(closest `{closest}`: {fmt_diff(d, pct=higher_better)}, paired 95% interval).")
    return (f"{label}: no single winner. `{best}` ({unit(best)}) is tied with " +
            ", ".join(f"`{n}` ({unit(n)})" for n in tied) + " (paired 95% intervals of their differences include 0)" +
            ("; the rest are significantly worse." if len(tied) + 1 < len(ranked) else "."))


def advice(rows: list[dict], leaves: dict[str, str]) -> list[str]:
    by = {r["node"]: r for r in rows}
    leaf_nodes = list(dict.fromkeys(leaves.values()))
    out = [winner(rows, leaf_nodes, DOMAIN, "Best domain perplexity among the orderings")]
    for t in tasks_of(rows):
        out.append(winner(rows, leaf_nodes, f"acc:{t}", f"Best {t} accuracy among the orderings"))
    smallest_o, smallest_n = min(leaves.items(), key=lambda kv: (by[kv[1]]["size"]["bytes"], by[kv[1]]["ppl"][DOMAIN]))
    out.append(f"Smallest deployable: **{smallest_o}** (`{smallest_n}`, {_mb(by[smallest_n]['size']['bytes'])} MB, "
               f"domain ppl {by[smallest_n]['ppl'][DOMAIN]:.2f}; loads with {loads_with(by[smallest_n])}).")
    front = pareto(rows, DOMAIN)
    out.append("Pareto-optimal (bytes vs domain ppl): " + ", ".join(f"`{n}`" for n in front) + ".")
    on_base = [r["node"] for r in rows if len(r["chain"]) == 1 and r["kind"] == "peft" and "prune" not in r]  # not pruned while training
    if len(on_base) > 1:  # the hybrid against the single-method baselines, on the same base and data
        out.append(winner(rows, on_base, DOMAIN, "PEFT methods on the base model (domain perplexity)"))
    flagged = [r["node"] for r in rows if r.get("flags")]
    if flagged:
        out.append("Flagged orders: " + ", ".join(f"`{n}` ({'; '.join(by[n]['flags'])})" for n in flagged) + ".")
    return out


def seed_mean_nll(r: dict, corpus: str) -> list[float]:
    """Per-window NLL averaged over a node's training seeds (one seed: its own): pairs windows across nodes while
    not letting one lucky seed decide."""
    runs = [r["nll_per_window"][corpus]] + [s["nll_per_window"][corpus] for s in r.get("seeds", {}).values()]
    return [sum(xs) / len(xs) for xs in zip(*runs)]


def ablation(rows: list[dict], methods: dict[str, list[str]], corpora: list[str]) -> list[str]:
    """The PEFT ablation: every method subset trained on the base (orderings of one peft stage, equal steps and
    data), as mean ± sd over seeds, with its cost, and whether the full combination beats the best single method
    (paired bootstrap on the seed-averaged per-window NLLs). `methods`: node -> its PEFT methods."""
    base = rows[0]
    on_base = [r for r in rows if r["node"] in methods]
    if len(on_base) < 2:
        return []
    tasks = tasks_of(rows)
    head = (["node", "methods", "seeds"] + [f"ppl {c} mean ± sd" for c in corpora] + ["Δ domain ppl vs base (seed mean)"] +
            [f"acc {t} % (seed {on_base[0]['train']['seed']})" for t in tasks] +
            ["trainable params", "train tok/s", "train peak MB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_nll = base["nll_per_window"][DOMAIN]
    for r in sorted(on_base, key=lambda r: (len(methods[r["node"]]), r["node"])):
        runs = [r["train"]] + [t for t in r.get("train_seeds", [])[1:]]
        acc = []
        for t in tasks:
            z = r["zeroshot"][t]
            acc.append(f"{100 * z[main_metric(z)]:.1f}")
        lines.append("| " + " | ".join(
            [f"`{r['node']}`", "+".join(methods[r["node"]]), str(len(_seed_ppls(r, DOMAIN)))] +
            [_mean_sd(_seed_ppls(r, c)) for c in corpora] +
            [fmt_diff(stats.paired_ppl_diff(base_nll, seed_mean_nll(r, DOMAIN)))] + acc +
            [f"{r['train']['trainable_params']:,}", f"{sum(t['tokens_per_s'] for t in runs) / len(runs):,.0f}",
             f"{max(t['peak_memory_mb'] for t in runs):,.0f}"]) + " |")
    out = ["## PEFT ablation: every method subset on the base, equal steps and data", "", "\n".join(lines), ""]
    ranked = lambda group: sorted(group, key=lambda r: stats.spread(_seed_ppls(r, DOMAIN))[0])  # noqa: E731
    singles = ranked([r for r in on_base if len(methods[r["node"]]) == 1])
    most = max(len(m) for m in methods.values())
    full = [r for r in on_base if len(methods[r["node"]]) == most]
    if singles and most > 1 and len(full) == 1:
        s, h = singles[0], full[0]
        d = stats.paired_ppl_diff(seed_mean_nll(s, DOMAIN), seed_mean_nll(h, DOMAIN))
        verdict = ("beats" if d.hi < 0 else "is worse than" if d.lo > 0 else "is tied with")
        out.append(f"- The full combination `{h['node']}` ({'+'.join(methods[h['node']])}) **{verdict}** the best single "
                   f"method `{s['node']}` on domain perplexity: {fmt_diff(d)} (paired 95% interval on seed-averaged "
                   f"windows; it trains {h['train']['trainable_params'] / max(1, s['train']['trainable_params']):.1f}x "
                   f"the parameters" + (f"; seed sd {stats.spread(_seed_ppls(h, DOMAIN))[1]:.2f} vs "
                                        f"{stats.spread(_seed_ppls(s, DOMAIN))[1]:.2f}: a gap under ~2 sd is one a new "
                                        f"seed could close" if "seeds" in h and "seeds" in s else
                                        "; one seed each: the interval does not cover seed variation") + ").")
    best_any = ranked(on_base)[0]
    out.append(f"- Best subset by seed-mean domain perplexity: `{best_any['node']}` "
               f"({'+'.join(methods[best_any['node']])}, {_mean_sd(_seed_ppls(best_any, DOMAIN))}).")
    by_set = {frozenset(m): r for r in on_base for n, m in methods.items() if r["node"] == n}
    for soft in ("prompt", "prefix"):  # does LoRA diminish the need for prompt / prefix tuning?
        alone, lora, both = by_set.get(frozenset([soft])), by_set.get(frozenset(["lora"])), by_set.get(frozenset(["lora", soft]))
        if alone and lora and both:
            g0 = stats.paired_ppl_diff(base_nll, seed_mean_nll(alone, DOMAIN))
            g1 = stats.paired_ppl_diff(seed_mean_nll(lora, DOMAIN), seed_mean_nll(both, DOMAIN))
            out.append(f"- Adding the {soft} on the plain base changes domain ppl by {fmt_diff(g0)}; on top of LoRA by "
                       f"{fmt_diff(g1)}" + (" — LoRA leaves it little to add." if abs(g1.estimate) < abs(g0.estimate) / 2
                                            else "."))
    return out + [""]


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
            ci = r.get("ppl_ci95", {}).get(corpus)
            if ci:  # the 95% bootstrap interval: overlapping bars are a warning against reading a ranking
                ax.errorbar(x, y, yerr=[[y - ci[0]], [ci[1] - y]], fmt="none", ecolor=style[0], alpha=0.5, lw=1, zorder=2)
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
        ax.set_title(f"{corpus}: quality vs size (★ base, ● ordering leaf, · intermediate; bars: 95% CI)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> bool:
    """Training curves of every PEFT node, one panel each: held-out loss on the fixed sample (solid), the mean
    training loss since the previous point (dotted), the learning rate (grey, right axis). False when no node has one."""
    curves = [(r["node"], r["train"]["curve"]) for r in rows if r.get("train", {}).get("curve")]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(curves))
    n_rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5 * cols, 3.6 * n_rows), squeeze=False)
    for ax, (node, curve) in zip(axes.flat, curves):
        steps = [p["step"] for p in curve]
        ax.plot(steps, [p["heldout_loss"] for p in curve], "o-", c="tab:red", ms=3, label="held-out loss")
        train = [(p["step"], p["train_loss"]) for p in curve if p["train_loss"] is not None]
        ax.plot([s for s, _ in train], [v for _, v in train], ":", c="tab:blue", label="train loss (mean since last point)")
        ax.set_title(node, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / target token)")
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [p["lr"] for p in curve], c="gray", lw=0.8, alpha=0.6)
        lr_ax.set_ylabel("lr", color="gray", fontsize=8)
        lr_ax.tick_params(labelsize=7, colors="gray")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(params: Params, root: Path = Path(".")) -> dict:
    plan = build_plan(params)
    rows = load_rows(params, root)
    corpora = list(rows[0]["ppl"])
    out = root / REPORTS
    out.mkdir(parents=True, exist_ok=True)
    ev = rows[0]["eval"]
    conventions = "; ".join(f"**{c}**: {ev['tokens'][c]:,} tokens = {ev['windows'][c]} windows, {ev['conventions'][c]}"
                            for c in corpora)
    zs = rows[0].get("zeroshot", {})
    zs_line = ("Zero-shot accuracy (lm-evaluation-harness 0.4 task definitions over local copies of the data; "
               "acc_norm where the task defines it, else acc): " +
               ", ".join(f"{t} {main_metric(z)}, {z['n']} of {z['size']} items" for t, z in zs.items()) +
               " (a seeded sample, the same items for every node). ") if zs else ""
    md = ["# Compression orderings compared", "",
          f"Perplexity over non-overlapping windows of {ev['seq_len']} tokens (remainder dropped): {conventions}. "
          f"{zs_line}Every value has a 95% bootstrap interval over windows / items; every Δ is a paired bootstrap "
          "interval on the same windows, marked * where it excludes 0 and n.s. where it does not. "
          "`MB deploy` = base weights + PEFT files needed to serve the node, as really stored (sparse checkpoints stay dense, "
          "so zeros cost full bytes); `MB bitmask est.` = an *estimate*, for nodes with zeros in fp weights, of MB deploy "
          "if the pruned linears were stored as nonzero values + 1 bit per weight (no such file is written); `MB stored` = what its artifact itself holds "
          "(adapter-only nodes reference their parent's weights). `loads with` = the libraries that load the node at "
          f"its reported quality; `{artifact.HYBRID_LOADER}` = the adapter / soft-prompt / prefix code, which plain clients "
          "lack (`python -m pipeline export NODE DIR` writes it beside the node as a standalone file).", "",
          *[f"- {line}" for line in advice(rows, plan.leaves)], "",
          table(rows, corpora, plan.leaves), "", "![Pareto plot](pareto.png)", "",
          *ablation(rows, {n: list(params.stages[node.chain[0]].methods) for n, node in plan.nodes.items()
                           if len(node.chain) == 1 and params.stages[node.chain[0]].kind == "peft"
                           and not params.stages[node.chain[0]].prune_during}, corpora)]  # same base, same weights
    if plot_curves(rows, out / "train_curves.png"):
        md += ["Training curves of the PEFT nodes (held-out loss on a fixed sample of the domain's held-out split):", "",
               "![Training curves](train_curves.png)", ""]
    (out / "compare.md").write_text("\n".join(md))
    summary = {}
    for r in rows:
        entry = {"loads_with": loads_with(r)}
        for c in corpora:
            entry[f"ppl_{c}"] = r["ppl"][c]
            lo, hi = r["ppl_ci95"][c]
            entry[f"ppl_{c}_lo"], entry[f"ppl_{c}_hi"] = lo, hi
        for t, z in r.get("zeroshot", {}).items():
            entry[f"acc_{t}"] = round(z[main_metric(z)], 4)
        entry.update({"mb": round(r["size"]["bytes"] / 2**20, 2), "bits_per_weight": r["size"]["bits_per_weight"],
                      "sparsity": r["params"]["sparsity"], "decode_tok_s": r["latency"]["decode_tok_s"]})
        summary[r["node"]] = entry
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "nodes.csv", "w", newline="") as fh:  # one row per node, for DVC plots
        writer = csv.DictWriter(fh, fieldnames=["node", *next(iter(summary.values()))])
        writer.writeheader()
        writer.writerows({"node": n, **v} for n, v in summary.items())
    plot(rows, corpora, plan.leaves, out / "pareto.png")
    return {"rows": rows, "markdown": "\n".join(md), "summary": summary}
