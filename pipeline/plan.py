"""Orderings -> a trie of nodes. Validates every ordering before any work starts.

A node is a prefix of an ordering; orderings that share a prefix share its nodes, so the prefix runs once.
The base model is the root node `base`. A node's name is its chain of stage configs joined by '-'.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config import Params, PeftCfg

HARMA = "quantizing before pruning loses quality (Harma et al. 2024, arXiv 2405.20935)"
INEXACT_FOLD = ("a linear adapter folded into a sparse down_proj whose zeros merge keeps (keep_mask) is no longer exact; "
                "see merge_error, or set keep_mask: false on that merge")


class PlanError(ValueError):
    """An invalid ordering: one line naming the ordering, the position and a fix."""


@dataclass(frozen=True)
class State:
    """What the model is after a node: the ordering rules are checks on this."""

    quant: str | None = None          # None (fp) | a quantize method: "nf4" | "int8" | "gptq" | "rtn"
    sparse: bool = False              # zeros in dense weights (unstructured / N:M prune)
    shrunk: bool = False              # smaller shapes (structured prune)
    lora: bool = False                # unmerged LoRA present
    modules: tuple[str, ...] = ()     # adapter / prompt modules present (kept through merges)
    adapter_act: str | None = None    # the adapter's activation; merge folds "linear" adapters into the weights
    merged: bool = False
    quantized_before: bool = False    # for the Harma flag
    int8_embedding: bool = False      # the base's embedding stored as int8 apart from its checkpoint

    def describe(self) -> str:
        parts = [self.quant or "fp"]
        if self.sparse:
            parts.append("sparse")
        if self.shrunk:
            parts.append("structured")
        peft = (("lora",) if self.lora else ()) + self.modules
        if peft:
            parts.append("+" + "+".join(peft))
        if self.adapter_act == "linear":
            parts[-1] = parts[-1].replace("adapter", "adapter(linear)")
        if self.merged:
            parts.append("merged")
        if self.int8_embedding:
            parts.append("int8-embedding")
        return " ".join(parts)


def advance(state: State, kind: str, cfg) -> tuple[State, str | None]:
    """Apply one stage to a state. Raises ValueError(reason; fix); returns (new state, flag or None)."""
    flag = None
    if kind == "prune":
        if state.quant:
            raise ValueError(f"cannot prune a {state.quant} model; put a peft+merge (which dequantizes) before it, or prune before quantizing")
        if state.lora:
            raise ValueError("cannot prune under unmerged LoRA; put a merge stage before it")
        if state.quantized_before:
            flag = HARMA
        if cfg.structured:  # a smaller dense model: its zeros, if any, come from an earlier prune
            return replace(state, shrunk=True), flag
        return replace(state, sparse=True), flag
    if kind in ("quantize", "ptq"):
        if state.quant:
            raise ValueError(f"the model is already {state.quant}; put a peft+merge (which dequantizes) before it")
        if kind == "quantize" and (state.lora or state.modules or state.merged):
            raise ValueError("quantize is for the base model; after peft/merge use a ptq stage")
        # ptq under unmerged PEFT quantizes the base weights only; the PEFT parts stay in fp32 beside them
        return replace(state, quant=cfg.method, quantized_before=True,
                       int8_embedding=cfg.embeddings == "int8"), flag
    if kind == "peft":
        if state.lora or state.modules:
            raise ValueError("the model already has PEFT modules (two peft stages on one model); merge is not enough, drop one peft stage")
        assert isinstance(cfg, PeftCfg)
        sparse = state.sparse
        if cfg.prune_during:  # the base is pruned while the PEFT parts train: the rules of a prune stage apply
            if state.quant:
                raise ValueError(f"prune_during cannot prune a {state.quant} base; prune before quantizing (a prune stage "
                                 f"before {state.quant}, or this peft stage before the quantize stage), or drop prune_during")
            if state.quantized_before:
                flag = HARMA
            sparse = True
        return replace(state, sparse=sparse, lora="lora" in cfg.methods,
                       modules=tuple(m for m in cfg.methods if m != "lora"),
                       adapter_act=cfg.adapter_act if "adapter" in cfg.methods else None), flag
    if kind == "merge":
        if not (state.lora or state.modules) or state.merged:
            raise ValueError("nothing to merge: no peft stage since the last merge; add a peft stage before it or remove the merge")
        if state.adapter_act == "linear":  # folded into the MLP weights: no adapter module is left
            if state.sparse and cfg.keep_mask:
                flag = INEXACT_FOLD
            state = replace(state, modules=tuple(m for m in state.modules if m != "adapter"), adapter_act=None)
        # merge saves fp weights: the int8 embedding's values go into the checkpoint itself
        return replace(state, lora=False, quant=None, merged=True, int8_embedding=False), flag
    raise ValueError(f"unknown stage kind {kind!r}")


@dataclass
class Node:
    chain: tuple[str, ...]
    state: State
    orderings: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "-".join(self.chain) if self.chain else "base"

    @property
    def parent(self) -> str | None:
        if not self.chain:
            return None
        return "-".join(self.chain[:-1]) if len(self.chain) > 1 else "base"

    @property
    def config(self) -> str | None:
        return self.chain[-1] if self.chain else None


@dataclass
class Plan:
    nodes: dict[str, Node]           # topological: every parent before its children
    leaves: dict[str, str]           # ordering -> leaf node name

    def children(self, name: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent == name]

    def subtree(self, name: str) -> list[str]:
        prefix = self.nodes[name].chain
        return [n.name for n in self.nodes.values() if n.chain[: len(prefix)] == prefix]


def build_plan(params: Params) -> Plan:
    root = Node((), State())
    nodes: dict[str, Node] = {"base": root}
    leaves: dict[str, str] = {}
    for oname, chain in params.orderings.items():
        state, node = State(), root
        for pos, cname in enumerate(chain, start=1):
            cfg = params.stages[cname]
            try:
                state, flag = advance(state, cfg.kind, cfg)
            except ValueError as exc:
                raise PlanError(f"ordering '{oname}', position {pos} ({cname}, {cfg.kind}): {exc}") from None
            key = "-".join(chain[:pos])
            node = nodes.setdefault(key, Node(tuple(chain[:pos]), state))
            if flag and flag not in node.flags:
                node.flags.append(flag)
        node.orderings.append(oname)
        leaves[oname] = node.name
    for n in nodes.values():  # every ordering passing through a node, for labels
        n.orderings = [o for o, leaf in leaves.items() if nodes[leaf].chain[: len(n.chain)] == n.chain]
    # depth-first, children in the order the orderings name them: a printed trie shows each node under its parent
    kids: dict[str | None, list[str]] = {}
    for name, n in nodes.items():
        kids.setdefault(n.parent, []).append(name)
    order, todo = [], ["base"]
    while todo:
        name = todo.pop()
        order.append(name)
        todo += reversed(kids.get(name, []))
    return Plan({name: nodes[name] for name in order}, leaves)
