"""Orderings -> trie: shared prefixes give one node; invalid orders fail at plan time with a one-line fix."""
from __future__ import annotations

import copy

import pytest

from pipeline.config import parse_params
from pipeline.plan import HARMA, PlanError, build_plan
from test_config import default_raw


def plan_for(orderings: dict, extra_stages: dict | None = None):
    raw = copy.deepcopy(default_raw())
    raw["stages"].update(extra_stages or {})
    raw["orderings"] = orderings
    return build_plan(parse_params(raw))


def test_default_trie_shares_prefixes():
    plan = build_plan(parse_params(default_raw()))
    names = list(plan.nodes)
    assert len(names) == len(set(names))
    # qlora_gptq, qlora_nf4 and qlora_nf4_e8 share nf4 -> hybrid -> merge: one node each
    assert plan.nodes["nf4-hybrid-merge"].orderings == ["qlora_gptq", "qlora_nf4", "qlora_nf4_e8"]
    assert [n.name for n in plan.children("nf4-hybrid-merge")] == ["nf4-hybrid-merge-gptq4", "nf4-hybrid-merge-nf4_ptq",
                                                                   "nf4-hybrid-merge-nf4_ptq_e8"]
    assert plan.nodes["nf4-hybrid-merge-nf4_ptq_e8"].state.int8_embedding
    for ordering, leaf in plan.leaves.items():
        assert leaf in plan.nodes
        assert plan.nodes[leaf].chain == tuple(default_raw()["orderings"][ordering])
    for node in plan.nodes.values():  # topological: parents first
        if node.parent:
            assert names.index(node.parent) < names.index(node.name)
    total_stage_runs = sum(len(c) for c in default_raw()["orderings"].values())
    assert len(plan.nodes) - 1 < total_stage_runs


def test_states_follow_the_stages():
    plan = build_plan(parse_params(default_raw()))
    assert plan.nodes["wanda50-nf4"].state.quant == "nf4" and plan.nodes["wanda50-nf4"].state.sparse
    merged = plan.nodes["nf4-hybrid-merge"].state
    assert merged.quant is None and not merged.lora and merged.modules == ("adapter", "prompt")
    # depth-first: a subtree is contiguous and each node comes right under its parent's earlier children's subtrees
    assert plan.subtree("hybrid") == ["hybrid", "hybrid-merge", "hybrid-merge-wanda50", "hybrid-merge-wanda50-gptq4",
                                      "hybrid-merge-nf4_ptq", "hybrid-nf4_ptq"]
    names = list(plan.nodes)
    for name in names:  # so `plan` prints every node under its parent
        sub = plan.subtree(name)
        assert names[names.index(name): names.index(name) + len(sub)] == sub
    assert plan.nodes["hybrid-nf4_ptq"].state.quant == "nf4" and plan.nodes["hybrid-nf4_ptq"].state.lora  # unmerged
    assert plan.nodes["hybrid_pdp50"].state.sparse and plan.nodes["struct25"].state.shrunk


@pytest.mark.parametrize("chain, position, words", [
    (["merge"], 1, "nothing to merge"),
    (["hybrid", "merge", "merge"], 3, "nothing to merge"),
    (["nf4", "wanda50"], 2, "cannot prune a nf4 model"),
    (["nf4", "nf4"], 2, "already nf4"),
    (["hybrid", "lora_only"], 2, "two peft stages"),
    (["hybrid", "wanda50"], 2, "put a merge stage before it"),
    (["hybrid", "merge", "nf4"], 3, "use a ptq stage"),
    (["hybrid", "gptq4", "nf4_ptq"], 3, "already gptq"),
])
def test_invalid_orderings_fail_at_plan_time(chain, position, words):
    with pytest.raises(PlanError) as exc:
        plan_for({"mine": chain})
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"ordering 'mine', position {position} ({chain[position - 1]}" in msg
    assert words in msg


def test_quantize_before_prune_is_flagged_not_refused():
    plan = plan_for({"q_then_p": ["nf4", "hybrid", "merge", "wanda50"]})
    assert plan.nodes["nf4-hybrid-merge-wanda50"].flags == [HARMA]
    assert not plan.nodes["nf4-hybrid-merge"].flags


def test_ptq_under_peft_and_peft_over_gptq_plan():
    plan = plan_for({"ptq_first": ["hybrid", "gptq4", "merge"], "gptq_qlora": ["gptq_base", "lora_only", "merge"]},
                    {"gptq_base": {"kind": "quantize", "method": "gptq", "group_size": 64}})
    assert plan.nodes["hybrid-gptq4"].state.describe() == "gptq +lora+adapter+prompt"
    assert plan.nodes["hybrid-gptq4-merge"].state.quant is None
    assert plan.nodes["gptq_base-lora_only"].state.describe() == "gptq +lora"
