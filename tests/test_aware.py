"""Activation-aware compression: whitening optimality, allocation, streaming statistics, round trips."""
from __future__ import annotations

import pytest
import torch

from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.calibration import collect_input_stats, stream_blocks
from mpokit.calibration.fisher import collect_output_fisher
from mpokit.methods import AwareConfig
from mpokit.methods.aware.allocate import LayerSpectrum, allocate_global, allocate_uniform
from mpokit.methods.aware.refine import mpo_candidate
from mpokit.ops.whiten import output_error, output_factor, scaled_svd, whitened_svd, whitening_factor
from mpokit.surgery import find_targets
from conftest import tiny_llama


def correlated_inputs(n=2000, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix  # anisotropic activations


def lowrank(u, s, vt, r):
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_whitened_svd_error_identity_and_beats_plain_svd():
    x = correlated_inputs()
    w = torch.randn(40, 48, dtype=torch.float64)
    gram = x.T @ x
    factor = whitening_factor(gram, damp=0.0)
    u, s, vt = whitened_svd(w, factor)
    for r in (4, 12, 30):
        m = lowrank(u, s, vt, r)
        # the discarded weighted singular values are exactly the output error
        assert torch.linalg.matrix_norm((w - m) @ x.T) == pytest.approx(float(s[r:].norm()), rel=1e-6)
        pu, ps, pvt = torch.linalg.svd(w, full_matrices=False)
        plain = lowrank(pu, ps, pvt, r)
        assert output_error(w, m, gram) < output_error(w, plain, gram)  # negative control: plain SVD is worse
    assert torch.allclose(lowrank(u, s, vt, 40), w, atol=1e-8)  # full rank recovers W


@pytest.mark.parametrize("diagonal", [False, True])
def test_two_sided_svd_error_identity_and_beats_input_only(diagonal):
    x = correlated_inputs()
    g = correlated_inputs(n=500, d=40, seed=1)  # output-side "gradients", anisotropic too
    w = torch.randn(40, 48, dtype=torch.float64)
    s_in = whitening_factor(x.T @ x, damp=0.0)
    gram_out = g.T @ g
    left = output_factor(torch.diagonal(gram_out) if diagonal else gram_out, damp=0.0)
    weight_out = torch.diag(left ** 2) if diagonal else gram_out
    # G's scale is kept (global allocation compares layers in loss units)
    scaled = output_factor(4 * (torch.diagonal(gram_out) if diagonal else gram_out), damp=0.0)
    assert torch.allclose(scaled, 2 * left, rtol=1e-6)

    def two_sided(m):  # sqrt(tr(G_out D C D^T)), D = W - M
        d = w - m
        return float(torch.einsum("ab,bi,ij,aj->", weight_out, d, x.T @ x, d).clamp_min(0).sqrt())

    u, s, vt = whitened_svd(w, s_in, left)
    iu, is_, ivt = whitened_svd(w, s_in)
    for r in (4, 12, 30):
        assert two_sided(lowrank(u, s, vt, r)) == pytest.approx(float(s[r:].norm()), rel=1e-6)
        assert two_sided(lowrank(u, s, vt, r)) < two_sided(lowrank(iu, is_, ivt, r))  # input-only is worse here
    assert torch.allclose(lowrank(u, s, vt, 40), w, atol=1e-8)


def test_output_fisher_equals_autograd_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]
    batches = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    fisher = collect_output_fisher(model, names, batches, full_max=64, progress=False)
    outs = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, []).append(o))
             for n in names]
    expect = {n: 0 for n in names}
    for b in batches:
        outs.clear()
        out = model(input_ids=b, labels=b)
        grads = torch.autograd.grad(out.loss * b.numel(), [outs[n][0] for n in names])
        for n, gr in zip(names, grads):
            gr = gr.reshape(-1, gr.shape[-1])
            expect[n] = expect[n] + (gr.T @ gr if gr.shape[1] <= 64 else (gr ** 2).sum(0))
    for h in hooks:
        h.remove()
    assert fisher[names[0]].shape == (64, 64) and fisher[names[1]].dim() == 1  # gate is wider than full_max
    for n in names:
        assert torch.allclose(fisher[n], expect[n], rtol=1e-4, atol=1e-7), n
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_scaled_svd_full_rank_recovers():
    w = torch.randn(10, 16, dtype=torch.float64)
    u, s, vt = scaled_svd(w, torch.rand(16, dtype=torch.float64) + 0.1)
    assert torch.allclose(lowrank(u, s, vt, 10), w, atol=1e-10)


def test_whitening_factor_handles_rank_deficient_gram():
    x = torch.randn(5, 20, dtype=torch.float64)  # rank 5 Gram of size 20
    s = whitening_factor(x.T @ x)
    assert torch.isfinite(s).all()


def test_allocate_global_prefers_layers_with_larger_spectra_and_respects_budget():
    spectra = {
        "big": LayerSpectrum(32, 32, torch.linspace(10, 1, 32)),
        "small": LayerSpectrum(32, 32, torch.linspace(1, 0.1, 32)),
    }
    ranks = allocate_global(spectra, 0.5)
    assert ranks["big"] is None or ranks["small"] is not None
    rank_big = 32 if ranks["big"] is None else ranks["big"]
    assert rank_big > (ranks["small"] or 32)
    used = sum(32 * 32 if r is None else r * 64 for r in ranks.values())
    assert used <= 0.5 * 2 * 32 * 32
    uni = allocate_uniform(spectra, 0.5)
    assert uni["big"] == uni["small"] == 8


def test_stream_blocks_matches_whole_model_statistics():
    model = tiny_llama()
    names = find_targets(model)
    batches = [torch.randint(0, 128, (1, 16)) for _ in range(3)]
    whole = collect_input_stats(model, names, batches, progress=False)
    seen = {}

    def grab(_, local, stats):
        for n in local:
            seen[n] = stats.gram(n)
        return False

    assert stream_blocks(model, names, batches, grab, progress=False) == []
    for n in names:
        assert torch.allclose(seen[n], whole.gram(n), rtol=1e-4, atol=1e-6), n
    crosses = {}

    def grab_cross(_, local, stats):
        crosses.update({n: stats.cross_gram(n) for n in local})
        return False

    stream_blocks(model, names, batches, grab_cross, progress=False, reference=True)
    for n in names:  # nothing was changed, so reference and current inputs coincide: X_ref^T X == X^T X
        assert torch.allclose(crosses[n], whole.gram(n), rtol=1e-4, atol=1e-6), n
    # q/k/v share one input, so one Gram
    assert whole.group_of["model.layers.0.self_attn.q_proj"] == whole.group_of["model.layers.0.self_attn.v_proj"]
    assert whole.group_of["model.layers.0.self_attn.q_proj"] != whole.group_of["model.layers.0.self_attn.o_proj"]


@pytest.mark.parametrize("config", [
    AwareConfig(budget=0.6),
    AwareConfig(budget=0.6, allocation="uniform"),
    AwareConfig(budget=0.6, sensitivity="none"),
    AwareConfig(budget=0.6, scaling="diag"),
    AwareConfig(budget=0.6, scaling="none"),
    AwareConfig(budget=0.6, layouts=("lowrank", "mpo"), refine_steps=5),
])
def test_aware_compress_budget_roundtrip(config, tmp_path):
    model = tiny_llama()
    batches = [torch.randint(0, 128, (1, 32)) for _ in range(4)]
    x = torch.randint(0, 128, (1, 20))
    report = compress_(model, config, batches=batches, progress=False)
    assert report.kept_fraction <= 0.6 + 1e-9
    assert report.kept_fraction >= 0.55  # the budget is spent, not wasted
    out = model(x).logits
    save_compressed(model, tmp_path / "ck")
    again = load_compressed(tmp_path / "ck")
    assert torch.equal(again(x).logits, out)
    dense = unload_(again)
    assert torch.allclose(dense(x).logits, out, atol=1e-4)


def test_aware_beats_datafree_svd_on_output_error():
    """On a real-data-like setting (correlated inputs), whitening lowers the model's output error."""
    torch.manual_seed(0)
    ref_model = tiny_llama()
    batches = [torch.randint(0, 128, (1, 32)) for _ in range(8)]
    x = torch.cat(batches[:2], 1)
    ref = ref_model(x).logits.detach()
    errors = {}
    for scaling in ("none", "whiten"):
        model = tiny_llama()
        model.load_state_dict(ref_model.state_dict())
        compress_(model, AwareConfig(budget=0.5, scaling=scaling, sensitivity="none", allocation="uniform"),
                  batches=batches,
                  progress=False)
        errors[scaling] = float((model(x).logits.detach() - ref).norm() / ref.norm())
    assert errors["whiten"] < errors["none"]


def test_mpo_candidate_only_returned_when_better():
    x = correlated_inputs(d=64)
    w = torch.randn(32, 64, dtype=torch.float64)
    factor = whitening_factor(x.T @ x)
    assert mpo_candidate(w.float(), factor, 1200, lowrank_error=0.0, steps=3) is None  # cannot beat zero error
    layer, err = mpo_candidate(w.float(), factor, 1200, lowrank_error=1.0, steps=10)
    assert layer.core_params() <= 1200 and 0 < err < 1.0


def test_aware_rejects_embeddings_and_needs_tokenizer():
    model = tiny_llama()
    with pytest.raises(ValueError, match="embeddings"):
        compress_(model, AwareConfig(target_modules=["embed_tokens"]), batches=[torch.randint(0, 128, (1, 8))])
    with pytest.raises(ValueError, match="tokenizer"):
        compress_(model, AwareConfig())
    with pytest.raises(ValueError, match="budget"):
        AwareConfig(budget=1.5)
    with pytest.raises(ValueError, match="scaling"):
        AwareConfig(scaling="magic")
    with pytest.raises(ValueError, match="sensitivity"):
        AwareConfig(sensitivity="hessian")
