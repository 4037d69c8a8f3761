"""Our GPTQ pass: the solver beats RTN, stays on its grids and walks as GPTQModel's does (group-aware reordering,
act-order: the same choices up to float16 scale rounding); true-sequential finds the llama input groups; the
sequential walk's Hessians are those of the inputs the layers see with LoRA, adapters, soft prompt and prefix active;
`calibration` picks whether the PEFT parts are active; a gptq stage over an unmerged PEFT node, and act-order / asymmetric settings, write
checkpoints that load back to exactly the quantized weights."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import run_project, tiny_params
from pipeline import artifact, data
from pipeline.config import ModelCfg, PeftCfg, PtqCfg
from pipeline.gptq import GPTQ, grid, quantize, quantize_together, walk_order
from pipeline.gptq_format import gptq_config
from pipeline.hessian import Hessian, input_groups, layer_inputs, linears_of, sequential
from pipeline.models import LM, load_base, load_lm
from pipeline.runner import artifact_path
from pipeline.stages import quantize as q
from pipeline.stages.peft import add_peft
from test_peft_methods import perturb

CPU = torch.device("cpu")


def correlated(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and uneven scales, as activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ mix * torch.rand(cols, generator=g).mul(3).add(0.1)


def rtn(w: torch.Tensor, bits: int, gs: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on the same group grids: each group's grid from its own weights, no error feedback."""
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], gs):
        scale, zero = grid(w[:, g0:g0 + gs], bits, sym)
        for c in range(g0, g0 + gs):
            out[:, c] = quantize(w[:, c], scale, zero, bits)[1]
    return out


def reference_walk(W: torch.Tensor, H: torch.Tensor, bits: int, gs: int, sym: bool, desc_act: bool,
                   percdamp: float, blocksize: int) -> torch.Tensor:
    """The reference's loop as first written here (IST-DASLab/gptq `fasterquant`, grids chosen inside the walk):
    what the block-graphed walk (grids hoisted before each block) must reproduce exactly."""
    W = W.clone()
    columns = W.shape[1]
    perm, group = walk_order(torch.diag(H), gs, desc_act, not desc_act)
    W, H = W[:, perm], H[perm][:, perm].clone()
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % gs == 0:
                scale, zero = grid(W[:, i1 + i:i1 + i + gs], bits, sym)
            w = W1[:, i]
            Q[:, i1 + i] = quantize(w, scale, zero, bits)[1]
            err = (w - Q[:, i1 + i]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("gs,act,blocksize", [(32, False, 128), (64, True, 48), (256, False, 64)],
                         ids=["g32-gar", "g64-act-odd-blocks", "group-spans-blocks"])
def test_hoisted_grids_walk_as_the_reference(gs, act, blocksize):
    """Grids chosen before each block's walk (so the walk can be one CUDA graph) give the reference's weights."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 64, bias=False)
    x = correlated(1024, 256, seed=3)
    solver = GPTQ(lin)
    solver.add_batch(x)
    H = solver.H.clone()
    expected = reference_walk(lin.weight.detach().float(), H, 4, gs, False, act, 0.01, blocksize)
    res = solver.quantize(4, gs, False, act, blocksize=blocksize, percdamp=0.01)
    assert torch.equal(res.weight, expected)


def test_linears_sharing_an_input_solve_as_one():
    """q / k / v (one input, one Hessian) stacked into one walk: each gets exactly what it gets alone."""
    torch.manual_seed(2)
    x = correlated(1024, 128, seed=5)
    shapes = (128, 32, 32)
    lins = [nn.Linear(128, rows, bias=False) for rows in shapes]
    alone = []
    for lin in lins:
        solo = nn.Linear(128, lin.out_features, bias=False)
        solo.weight.data.copy_(lin.weight.data)
        s = GPTQ(solo)
        s.add_batch(x)
        alone.append(s.quantize(4, 32, False, False, percdamp=0.01))
    solvers = [GPTQ(lin) for lin in lins]
    for s in solvers:
        s.add_batch(x)
    together = quantize_together(solvers, 4, 32, False, False, percdamp=0.01)
    for lin, a, t in zip(lins, alone, together):
        assert t.weight.shape == (lin.out_features, 128) and torch.equal(lin.weight, t.weight)
        for field in ("weight", "codes", "scales", "zeros", "g_idx"):
            torch.testing.assert_close(getattr(t, field), getattr(a, field), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, True, False), (3, -1, False, True), (2, 64, False, False),
                                                (8, 32, True, True), (4, 64, False, True)])
def test_gptq_beats_rtn_and_stays_on_its_grids(bits, group, sym, act):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=False)
    w = lin.weight.detach().clone()
    x = correlated(2048, 128)
    solver = GPTQ(lin)
    for chunk in x.split(512):
        solver.add_batch(chunk)
    res = solver.quantize(bits, group, sym, act, percdamp=0.01)
    assert torch.equal(lin.weight, res.weight)
    gptq_err = (x @ (w - res.weight).T).norm()
    rtn_err = (x @ (w - rtn(w, bits, 128 if group == -1 else group, sym)).T).norm()
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)
    # every weight is a code of its group's grid, dequantized as the checkpoint's kernels do (float16 product)
    maxq = 2 ** bits - 1
    assert res.codes.min() >= 0 and res.codes.max() <= maxq
    gi = res.g_idx.long()
    on_grid = (res.scales[:, gi].half() * (res.codes - res.zeros[:, gi]).half()).float()
    assert torch.equal(res.weight, on_grid)
    assert torch.equal(res.zeros, res.zeros.round()) and (res.zeros >= 0).all() and (res.zeros <= maxq).all()
    if sym:
        assert (res.zeros == 2 ** (bits - 1)).all()
    n_groups = 1 if group == -1 else 128 // group
    assert res.scales.shape == (96, n_groups) and torch.bincount(gi).tolist() == [128 // n_groups] * n_groups
    if n_groups > 1:  # act-order interleaves the groups over the columns
        assert act == (not torch.equal(gi, gi.sort().values))


def test_group_aware_order_walks_whole_groups_salient_first():
    diag = torch.rand(256, generator=torch.Generator().manual_seed(0))
    perm, group = walk_order(diag, 64, desc_act=False, group_aware=True)
    walked = perm.view(4, 64)
    assert torch.equal(group, perm // 64) and (group.view(4, 64) == group.view(4, 64)[:, :1]).all()  # whole groups
    tops = diag[walked].max(1).values
    assert torch.equal(tops, tops.sort(descending=True).values) and tops[0] == diag.max()  # salient group first
    assert (diag[walked].diff(dim=1) <= 0).all()  # each group by decreasing diag(H)
    assert torch.equal(walk_order(diag, 64, False, False)[0], torch.arange(256))


@pytest.mark.parametrize("desc_act", [False, True], ids=["group-aware", "act-order"])
def test_solver_matches_gptqmodel(desc_act):
    """GPTQModel 7.6's GPTQ on the same inputs: the same groups and nearly the same integers (ours rounds each scale
    to float16 as the checkpoint stores it, so a few roundings tip the other way), the same output error."""
    from gptqmodel.quantization.gptq import GPTQ as Reference

    cfg = ptq(group_size=32, desc_act=desc_act)
    torch.manual_seed(0)
    ours_lin = nn.Linear(128, 96, bias=False)
    ref_lin = nn.Linear(128, 96, bias=False)
    ref_lin.weight.data.copy_(ours_lin.weight)
    w = ours_lin.weight.detach().clone()
    x = correlated(2048, 128)
    ours, ref = GPTQ(ours_lin), Reference(ref_lin, gptq_config(cfg))
    ref.quantizer.configure(perchannel=True)
    ref.fallback = None
    for chunk in x.split(512):
        ours.add_batch(chunk)
        ref.add_batch(chunk, None)
    q_ref, scales, _, g_idx, *_ = ref.quantize()
    res = ours.quantize(4, 32, True, desc_act, percdamp=cfg.damp_percent)
    assert torch.equal(res.g_idx, g_idx) and torch.allclose(res.scales, scales, rtol=1e-3)
    assert ((res.weight - q_ref).abs() > 1e-4).float().mean() < 0.05
    err_ours, err_ref = (x @ (w - res.weight).T).norm(), (x @ (w - q_ref).T).norm()
    assert abs(err_ours / err_ref - 1) < 0.01, (err_ours, err_ref)


@torch.no_grad()
def deployed_hessians(lm: LM, calib: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per base linear, the Hessian of its inputs in an ordinary forward of the whole LM (what deployment computes)."""
    from pipeline.adapters import decoder_layers

    hs = {f"{i}.{n}": Hessian(m) for i, layer in enumerate(decoder_layers(lm.base)) for n, m in linears_of(layer).items()}
    handles = [h.layer.register_forward_hook(lambda _m, inp, _o, h=h: h.add_batch(inp[0])) for h in hs.values()]
    for ids in calib:
        lm.logits(ids)
    for handle in handles:
        handle.remove()
    return {n: h.H for n, h in hs.items()}


@pytest.fixture
def peft_lm(tiny_model) -> LM:
    """The tiny base with LoRA, adapters, soft prompt and prefix, perturbed away from their identity init."""
    model, tok = load_base(tiny_model, "hf", ModelCfg(source=str(tiny_model), device="cpu"), CPU)
    lm = LM(model, tok, None, CPU)
    add_peft(lm, PeftCfg(kind="peft", methods=["lora", "adapter", "prompt", "prefix"], prefix_tokens=4), seed=0)
    perturb(lm)
    return lm


def test_input_groups_are_the_true_sequential_subsets(peft_lm):
    from pipeline.adapters import decoder_layers

    groups = input_groups(peft_lm, decoder_layers(peft_lm.base)[1], *layer_inputs(peft_lm, [torch.arange(8)[None]])[0])
    plain = [[n.replace(".base_layer", "").split(".")[-1] for n in g] for g in groups]
    assert plain == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@pytest.mark.parametrize("true_sequential", [False, True], ids=["one-pass", "true-sequential"])
def test_sequential_hessians_see_every_peft_part(tiny_model, peft_lm, true_sequential):
    lm, tok = peft_lm, peft_lm.tokenizer
    calib = [torch.randint(0, len(tok), (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen: dict[str, torch.Tensor] = {}
    sequential(lm, calib, Hessian, lambda group: seen.update({n: h.H.clone() for n, h in group.items()}), "hessians", true_sequential)
    expected = deployed_hessians(lm, calib)
    assert set(seen) == set(expected) and any("base_layer" in n for n in seen)  # LoRA's base layers, not lora_A / B
    for name in seen:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-4, atol=1e-5)
    lm.hybrid.detach()  # and without the PEFT parts the inputs differ: the test above is not vacuous
    plain = LM(load_base(tiny_model, "hf", ModelCfg(source=str(tiny_model), device="cpu"), CPU)[0], tok, None, CPU)
    base_only = deployed_hessians(plain, calib)
    assert not torch.allclose(base_only["1.mlp.down_proj"], expected["1.mlp.down_proj"], rtol=1e-2)


@pytest.fixture(scope="module")
def hybrid_node(tmp_path_factory, tiny_model):
    """The tiny project's base and an unmerged hybrid node (LoRA + adapters + prompt, a few training steps)."""
    root = tmp_path_factory.mktemp("gptq_own")
    params, _ = run_project(root, tiny_params(tiny_model, steps=2), ["base", "hybrid"])
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    yield params, artifact_path("base"), artifact_path("hybrid")
    mp.undo()


def ptq(**kw) -> PtqCfg:
    return PtqCfg(kind="ptq", method="gptq", **{"calibration": "peft", **kw})


def test_calibration_picks_the_parts(hybrid_node, tmp_path, monkeypatch):
    """`peft` calibrates with the node's PEFT parts active, `base` without them; both by our pass."""
    params, base, hybrid = hybrid_node
    ran = []
    monkeypatch.setattr(q, "gptq_own", lambda *a, **k: ran.append(k["parts"]))
    for src, calibration in [(hybrid, "peft"), (hybrid, "base"), (base, "peft")]:
        q.gptq(src, ptq(calibration=calibration), tmp_path, params)
    assert ran == [True, False, True]
    assert load_lm(hybrid, params.model).hybrid is not None and load_lm(hybrid, params.model, parts=False).hybrid is None


@pytest.mark.integration  # ~45 s on 2 cores: a stage with its reload check, then two more passes
def test_gptq_stage_over_unmerged_peft_reloads_and_calibrates_with_peft(hybrid_node, tmp_path):
    params, base, hybrid = hybrid_node
    cfg = ptq(group_size=64)
    info = q.quantize(hybrid, cfg, tmp_path, params)  # raises unless the reload holds exactly the quantized weights
    assert info["format"] == "gptq" and info["roundtrip"]["weights_max_abs_diff"] == 0
    assert (artifact.peft_dir(tmp_path) / "lora").is_dir()  # the PEFT parts beside the quantized base
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (4, 64, True, False, "gptq")
    # the same pass with the PEFT parts off (the base alone) chooses other integers
    calib = data.calibration(load_lm(base, params.model).tokenizer, params.data.calibration, params.seed)
    with_peft = q.gptq_pass(load_lm(hybrid, params.model), cfg, calib)
    base_only = q.gptq_pass(load_lm(base, params.model), cfg, calib)
    assert set(with_peft) == set(base_only) and "model.layers.0.self_attn.q_proj" in with_peft
    changed = [n for n in with_peft if not torch.equal(with_peft[n].codes, base_only[n].codes)]
    assert len(changed) == len(with_peft), f"unchanged under PEFT: {sorted(set(with_peft) - set(changed))}"


@pytest.mark.parametrize("setting", [dict(bits=4, group_size=64, desc_act=True), dict(bits=4, group_size=64, sym=False),
                                     pytest.param(dict(bits=3, group_size=-1, sym=False, desc_act=True),
                                                  marks=pytest.mark.integration)],  # ~20 s: int3 packing
                         ids=["act-order", "asym", "3bit-asym-act-order-per-channel"])
def test_act_order_and_asym_round_trip(hybrid_node, tmp_path, setting):
    params, _, hybrid = hybrid_node
    info = q.quantize(hybrid, ptq(**setting), tmp_path, params)  # a node with PEFT parts: our own pass
    assert info["roundtrip"]["weights_max_abs_diff"] == 0
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        setting["bits"], setting["group_size"], setting.get("sym", True), setting.get("desc_act", False))
    assert qc["meta"]["damp_percent"] == 0.05 and qc["meta"]["true_sequential"] is True
    assert qc["meta"]["act_group_aware"] is (not setting.get("desc_act", False) and setting["group_size"] > 0)
    assert "compress-pipeline:gptq" in qc["meta"]["quantizer"]


_TRITON_CHECK = """
import torch
from pipeline import gptq, gptq_triton
g = torch.Generator().manual_seed(0)
# ragged row tiles (not multiples of the kernel's 32), a width that is no power of 2 (padded columns), slices of larger
# matrices as quantize_together passes them (W[:, i1:i2], Hinv[i1:i2, i1:i2]), a grid per group of 16 columns
for rows, width, bits in ((50, 128, 4), (40, 80, 3)):
    Wbig = torch.randn(rows, width + 40, generator=g) * 0.02
    A = torch.randn(width + 40, width + 40, generator=g) / width
    Hbig = torch.linalg.cholesky(torch.linalg.inv(A @ A.T + torch.eye(width + 40)), upper=True)
    W, Hinv = Wbig[:, 20:20 + width], Hbig[20:20 + width, 20:20 + width]
    grids = [gptq.grid(W[:, c:c + 16], bits, False) for c in range(0, width, 16)]
    S = torch.stack([grids[c // 16][0] for c in range(width)], 1)
    Z = torch.stack([grids[c // 16][1] for c in range(width)], 1)
    W[:, 0] = S[:, 0] * (torch.arange(rows) % 4 - 1.5)  # exact ties: rounding half to even, not half up
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = gptq_triton.walk_block(*(t.to(dev) for t in (W, Hinv, S, Z)), bits)
    W1 = W.clone(); want = [torch.zeros_like(W1) for _ in range(3)]
    gptq._walk(W1, Hinv, S, Z, bits, *want)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b), (rows, width, (a.cpu() - b).abs().max())
print("ok")
"""


def test_triton_walk_equals_the_eager_walk(tmp_path):
    """The block walk's Triton kernel (the pipeline's walk on CUDA) gives the eager walk's codes, weights and errors
    bit for bit: on a GPU, else under Triton's CPU interpreter (TRITON_INTERPRET is read when a kernel is defined,
    hence a fresh process). Skipped where Triton is not installed (the CPU torch wheel has none)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
