"""MoE kernels and the MoEFFN layer: equal kernels, exact at top_k = E, real skipping of experts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpokit.layers.ffn import DenseFFN
from mpokit.layers.moe import MoEFFN
from mpokit.ops.experts import KERNELS, run_experts





def _weights(E=4, m=3, d=5, d_out=6, gated=True, bias=True, dtype=torch.float64):
    g = 2 if gated else 1
    w_in = torch.randn(E, g * m, d, dtype=dtype)
    b_in = torch.randn(E, g * m, dtype=dtype) if bias else None
    w_out = torch.randn(E, m, d_out, dtype=dtype)
    return w_in, b_in, w_out


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("scaled", [True, False])
def test_kernels_agree(gated, scaled):
    w_in, b_in, w_out = _weights(gated=gated)
    x = torch.randn(7, 5, dtype=torch.float64)
    sel = torch.randn(7, 4).topk(2, dim=1).indices
    scale = torch.rand(7, 2, dtype=torch.float64) if scaled else None
    ref = KERNELS["dense"](x, sel, w_in, b_in, w_out, F.silu, gated, scale)
    for name in ("loop", "gather"):
        out = KERNELS[name](x, sel, w_in, b_in, w_out, F.silu, gated, scale)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    other = torch.roll(sel, 1, dims=0)  # a different routing gives a different result
    assert not torch.allclose(KERNELS["loop"](x, other, w_in, b_in, w_out, F.silu, gated, scale), ref)


def test_unknown_mode_raises():
    w_in, b_in, w_out = _weights()
    with pytest.raises(ValueError, match="expected forward mode"):
        run_experts("fast", torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.long),
                    w_in, b_in, w_out, F.silu, True)


def _dense(gated: bool, n=12, d=8, bias=False, act="silu"):
    return DenseFFN(up=torch.randn(n, d, dtype=torch.float64), down=torch.randn(d, n, dtype=torch.float64), act=act,
                    gate=torch.randn(n, d, dtype=torch.float64) if gated else None,
                    up_bias=torch.randn(n, dtype=torch.float64) if bias else None,
                    down_bias=torch.randn(d, dtype=torch.float64) if bias else None)


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu_new"), (False, True, "relu")])
def test_all_experts_equal_dense_and_round_trip(gated, bias, act):
    ffn = _dense(gated, bias=bias, act=act)
    labels = torch.randperm(12) % 4  # 4 experts of 3 neurons, scattered
    moe = MoEFFN.from_dense(ffn, labels, top_k=4)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-10, atol=1e-10)
    back = moe.to_dense_ffn()  # neurons back in their original order: bit-exact weights
    assert torch.equal(back.up, ffn.up) and torch.equal(back.down, ffn.down)
    if gated:
        assert torch.equal(back.gate, ffn.gate)
    if bias:
        assert torch.equal(back.up_bias, ffn.up_bias) and torch.equal(back.down_bias, ffn.down_bias)
    moe.top_k = 2  # negative control: half the experts is not the dense FFN
    assert not torch.allclose(moe(x), ffn(x), atol=1e-3)


def test_top_k_selected_experts_match_masked_reference():
    ffn = _dense(True)
    moe = MoEFFN.from_dense(ffn, torch.arange(12) // 3, top_k=2)
    x = torch.randn(9, 8, dtype=torch.float64)
    sel = moe.select(x)
    contrib = moe.expert_outputs(x)  # (T, E, d)
    expected = contrib.gather(1, sel[..., None].expand(-1, -1, 8)).sum(1)
    torch.testing.assert_close(moe(x), expected, rtol=1e-10, atol=1e-10)
    # every expert's contribution sums to the dense output
    torch.testing.assert_close(contrib.sum(1), ffn(x), rtol=1e-10, atol=1e-10)


def test_unselected_experts_are_not_computed():
    """Poison one expert with NaN and route around it: the sparse paths never touch it, the dense one does."""
    moe = MoEFFN.from_dense(_dense(True), torch.arange(12) // 3, top_k=2)
    with torch.no_grad():
        moe.w_in[3].fill_(float("nan"))
        moe.router.net[-1].bias[3] = -1e6  # never in the top-2
    x = torch.randn(6, 8, dtype=torch.float64)
    for mode in ("loop", "gather"):
        moe.forward_mode = mode
        assert torch.isfinite(moe(x)).all()
    moe.forward_mode = "dense"
    assert torch.isnan(moe(x)).any()


def test_bad_inputs_raise():
    ffn = _dense(True)
    with pytest.raises(ValueError, match="same number of neurons"):
        MoEFFN.from_dense(ffn, torch.tensor([0] * 7 + [1] * 5), top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        MoEFFN.from_dense(ffn, torch.arange(12) // 3, top_k=5)
    moe = MoEFFN.from_dense(ffn, torch.arange(12) // 3, top_k=1)
    with pytest.raises(ValueError, match="last dim 8"):
        moe(torch.randn(2, 7, dtype=torch.float64))


def test_spec_round_trip():
    moe = MoEFFN.from_dense(_dense(False, bias=True, act="gelu_new"), torch.arange(12) // 4, top_k=2,
                            router_hidden=0, site_kind="gpt2")
    clone = MoEFFN.from_spec(moe.spec(), dtype=torch.float64)
    clone.load_state_dict(moe.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(clone(x), moe(x)) and clone.spec() == moe.spec()


def test_auto_kernel_choice():
    from mpokit.ops.experts import choose_kernel

    assert choose_kernel(2048, 8, 32) == "loop" and choose_kernel(1, 3, 32) == "loop"
    assert choose_kernel(16, 8, 32) == "dense"  # every expert busy with ~4 tokens: loop overhead dominates
    w_in, b_in, w_out = _weights(E=4)
    x, sel = torch.randn(3, 5, dtype=torch.float64), torch.tensor([[0, 1], [1, 2], [2, 3]])
    torch.testing.assert_close(run_experts("auto", x, sel, w_in, b_in, w_out, F.silu, True),
                               run_experts("loop", x, sel, w_in, b_in, w_out, F.silu, True))


def test_shared_experts_match_masked_reference():
    ffn = _dense(True, n=16)
    moe = MoEFFN.from_dense(ffn, torch.arange(16) // 4, top_k=1, shared_experts=1)
    x = torch.randn(9, 8, dtype=torch.float64)
    sel = moe.select(x)
    assert sel.min() >= 1 and moe.router.net[-1].out_features == 3  # the router never scores the shared expert
    contrib = moe.expert_outputs(x)  # (T, E, d)
    picked = torch.zeros(9, 4, dtype=torch.float64).scatter_(1, sel, 1.0)
    picked[:, 0] = 1.0  # shared: always on
    expected = (contrib * picked[..., None]).sum(1)
    for mode in ("loop", "gather", "dense"):
        moe.forward_mode = mode
        torch.testing.assert_close(moe(x), expected, rtol=1e-10, atol=1e-10)
    moe.shared_experts = 0  # negative control: without the shared expert the output differs
    assert not torch.allclose(moe(x[:, :]), expected, atol=1e-6)
    moe.shared_experts = 1
    moe.top_k = 3  # all routed experts + the shared one = the dense FFN
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-10, atol=1e-10)
    assert torch.equal(moe.to_dense_ffn().up, ffn.up)
    with pytest.raises(ValueError, match="shared_experts"):
        MoEFFN.from_dense(ffn, torch.arange(16) // 4, top_k=1, shared_experts=4)
    with pytest.raises(ValueError, match="top_k"):
        MoEFFN.from_dense(ffn, torch.arange(16) // 4, top_k=4, shared_experts=1)


def test_shared_spec_round_trip_and_old_specs():
    moe = MoEFFN.from_dense(_dense(True, n=16), torch.arange(16) // 4, top_k=2, shared_experts=1)
    clone = MoEFFN.from_spec(moe.spec(), dtype=torch.float64)
    clone.load_state_dict(moe.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(clone(x), moe(x)) and clone.spec() == moe.spec()
    old = {k: v for k, v in moe.spec().items() if k != "shared_experts"}
    assert MoEFFN.from_spec(old, dtype=torch.float64).shared_experts == 0  # specs saved before the option


def test_refit_lowers_output_error():
    from mpokit.methods.moefication.refit import refit_output_

    ffn = _dense(True, n=16)
    ffn.up_bias = torch.full((16,), 4.0, dtype=torch.float64)  # outputs with a mean: the bias term matters
    labels = torch.arange(16) // 2  # 8 experts of 2
    calib, test = torch.randn(400, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    moe = MoEFFN.from_dense(ffn, labels, top_k=3, shared_experts=1)
    plain = MoEFFN.from_dense(ffn, labels, top_k=3, shared_experts=1)
    plain.router.load_state_dict(moe.router.state_dict())  # same routing: only the refit differs

    def rel_err(m, x):
        with torch.no_grad():
            return float((m(x) - ffn(x)).norm() / ffn(x).norm())

    stats = refit_output_(moe, calib, ridge=1e-4)
    assert moe.b_out is not None and moe.spec()["bias_out"]
    assert stats["rel_error_before"] == pytest.approx(rel_err(plain, calib), rel=1e-6)
    assert stats["rel_error_after"] == pytest.approx(rel_err(moe, calib), rel=1e-4)
    assert rel_err(moe, test) < 0.9 * rel_err(plain, test)  # also on held-out inputs
    full = MoEFFN.from_dense(ffn, labels, top_k=7, shared_experts=1)  # nothing skipped: the refit changes nothing
    refit_output_(full, calib, ridge=0.0)
    torch.testing.assert_close(full(test), ffn(test), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ridge"):
        refit_output_(moe, calib, ridge=-1.0)
