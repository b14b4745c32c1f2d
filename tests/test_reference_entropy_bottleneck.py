# SPDX-License-Identifier: Apache-2.0
"""The factorized entropy model reference and module against CompressAI's EntropyBottleneck."""
import math

import pytest
import torch

from helpers import perturbed_compressai_eb

from cifd_kernels.backend import BackendUnavailableError
from cifd_kernels.nn.entropy_bottleneck import EntropyBottleneck
from cifd_kernels.reference import entropy_bottleneck as ref
from cifd_kernels.reference.philox import philox_noise

compressai_em = pytest.importorskip("compressai.entropy_models")
CEB = compressai_em.EntropyBottleneck

SHAPES = [(7, 5), (2, 5, 3, 4)]  # [B, C] and [N, C, H, W]
TOL64 = dict(rtol=1e-6, atol=1e-12)  # CompressAI's unstable form vs ours, both float64


def _perturbed(C=5, seed=0, dtype=torch.float64, **kw):
    return perturbed_compressai_eb(C, seed, dtype, **kw)


def _leaf_params(ceb):
    """Independent leaf copies of a CompressAI module's parameters, for our functions."""
    cp = lambda ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    return cp(ceb.matrices), cp(ceb.biases), cp(ceb.factors), ceb.quantiles.detach().clone().requires_grad_()


def _assert_grads(ours, theirs, **tol):
    for a, b in zip(ours, theirs):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, **tol)


def _y(shape, seed=1, scale=15.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    y[0] *= 4  # one sample reaches the tails
    return y.to(dtype)


# --------------------------------------------------------------------------- init
@pytest.mark.parametrize("filters", [(3, 3, 3, 3), (2, 4)])
def test_init_params_match_compressai(filters):
    torch.manual_seed(3)
    ceb = CEB(6, filters=filters, init_scale=7.0, tail_mass=1e-6)
    torch.manual_seed(3)
    p = ref.init_params(6, filters, init_scale=7.0, tail_mass=1e-6)
    for name in ("matrices", "biases", "factors"):
        theirs = list(getattr(ceb, name))
        assert len(p[name]) == len(theirs)
        for a, b in zip(p[name], theirs):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    torch.testing.assert_close(p["quantiles"], ceb.quantiles.detach(), rtol=0, atol=0)
    torch.testing.assert_close(p["target"], ceb.target, rtol=0, atol=0)


def test_init_params_generator_and_device():
    a = ref.init_params(4, generator=torch.Generator().manual_seed(9), device="meta")
    assert a["biases"][0].device.type == "meta"
    b = ref.init_params(4, generator=torch.Generator().manual_seed(9))
    c = ref.init_params(4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(b["biases"][2], c["biases"][2])
    with pytest.raises(ValueError, match="channels"):
        ref.init_params(0)
    with pytest.raises(ValueError, match="tail_mass"):
        ref.init_params(3, tail_mass=0.0)


# --------------------------------------------------------------------------- vs CompressAI
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_compressai(shape):
    C = shape[1]
    ceb = _perturbed(C).eval()
    mats, bias, facs, q = _leaf_params(ceb)
    y = _y(shape).requires_grad_()
    y_c = y.detach().clone().requires_grad_()

    yh, lik = ref.entropy_bottleneck(y, mats, bias, facs, ref.medians(q), mode="dequantize")
    yh_c, lik_c = ceb(y_c, training=False)
    assert lik.dtype == torch.float64 and lik.shape == y.shape
    assert (lik_c > 1e-6).any() and (lik_c < 1e-3).any()  # bulk and tails both exercised
    torch.testing.assert_close(yh, yh_c, rtol=0, atol=0)
    torch.testing.assert_close(lik, lik_c, **TOL64)

    g1, g2 = torch.randn_like(yh), torch.randn_like(lik)
    torch.autograd.backward((yh, lik), (g1, g2))
    torch.autograd.backward((yh_c, lik_c), (g1, g2))
    _assert_grads([y, q, *mats, *bias, *facs],
                  [y_c, ceb.quantiles, *ceb.matrices, *ceb.biases, *ceb.factors], **TOL64)
    assert q.grad[:, 0, 1].abs().sum() > 0  # medians get the dequantize gradient


@pytest.mark.parametrize("shape", SHAPES)
def test_noise_matches_compressai(shape, monkeypatch):
    C = shape[1]
    seed, offset = 1234, 77
    ceb = _perturbed(C, seed=1).train()
    mats, bias, facs, _ = _leaf_params(ceb)
    y = _y(shape, seed=2).requires_grad_()
    y_c = y.detach().clone().requires_grad_()

    # CompressAI adds its noise to [C, 1, N] rows; give it ours, moved to that layout.
    u_rows = philox_noise(shape, seed, offset).double().transpose(0, 1).reshape(C, 1, -1)

    def quantize(values, mode, means=None):
        assert mode == "noise"
        return values + u_rows
    monkeypatch.setattr(ceb, "quantize", quantize)

    yh, lik = ref.entropy_bottleneck(y, mats, bias, facs, mode="noise", seed=seed, offset=offset)
    yh_c, lik_c = ceb(y_c)
    torch.testing.assert_close(yh, yh_c, rtol=0, atol=0)
    torch.testing.assert_close(lik, lik_c, **TOL64)
    torch.testing.assert_close(ref.rate_bits(lik), -torch.log2(lik_c).flatten(1).sum(1), **TOL64)

    g1, g2 = torch.randn_like(yh), torch.randn_like(lik)
    torch.autograd.backward((yh, lik), (g1, g2))
    torch.autograd.backward((yh_c, lik_c), (g1, g2))
    _assert_grads([y, *mats, *bias, *facs], [y_c, *ceb.matrices, *ceb.biases, *ceb.factors], **TOL64)


def test_likelihood_matches_compressai_and_module_method():
    ceb = _perturbed(4, seed=5)
    mats, bias, facs, _ = _leaf_params(ceb)
    yh = _y((3, 4, 5), seed=6)
    rows = yh.transpose(0, 1).reshape(4, 1, -1)
    lik_c = ceb.likelihood_lower_bound(ceb._likelihood(rows)[0]).reshape(4, 3, 5).transpose(0, 1)
    torch.testing.assert_close(ref.likelihood(yh, mats, bias, facs), lik_c, **TOL64)
    m = EntropyBottleneck(4).double()
    m.load_state_dict(ceb.state_dict())
    torch.testing.assert_close(m.likelihood(yh), lik_c, **TOL64)
    # logits_cumulative on CompressAI's own [C, 1, N] layout
    torch.testing.assert_close(ref.logits_cumulative(rows, mats, bias, facs),
                               ceb._logits_cumulative(rows, stop_gradient=True), **TOL64)


def test_float32_upper_tail_is_accurate():
    """The sign trick keeps float32 accurate where sigmoid(upper) ~ 1 cancels."""
    ceb64 = _perturbed(3, seed=7)
    mats, bias, facs, q = _leaf_params(ceb64)
    y = torch.linspace(0, 60, 601, dtype=torch.float64)[None, None, :].expand(1, 3, -1) \
        + q.detach()[:, 0, 1].reshape(1, 3, 1)
    y = torch.round(y * 64) / 64  # exactly representable in float32
    lik64 = ref.likelihood(y, mats, bias, facs, bound=0.0)
    sel = (lik64 > 1e-8) & (lik64 < 1e-4)
    assert sel.sum() >= 10
    lik32 = ref.likelihood(y.float(), [t.float() for t in mats], [t.float() for t in bias],
                           [t.float() for t in facs], bound=0.0)
    assert lik32.dtype == torch.float32
    torch.testing.assert_close(lik32[sel].double(), lik64[sel], rtol=2e-3, atol=0)


def test_aux_loss_matches_compressai():
    ceb = _perturbed(5, seed=8)
    mats, bias, facs, q = _leaf_params(ceb)
    loss = ref.aux_loss(q, mats, bias, facs, ceb.target)
    loss_c = ceb.loss()
    torch.testing.assert_close(loss, loss_c, **TOL64)
    g = torch.randn((), dtype=torch.float64)
    (loss * g).backward()
    (loss_c * g).backward()
    torch.testing.assert_close(q.grad, ceb.quantiles.grad, **TOL64)
    assert q.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*mats, *bias, *facs])  # quantiles only


# --------------------------------------------------------------------------- hand-computed cases
def test_rate_hand_computed():
    lik = torch.tensor([[0.5, 0.25], [1.0, 0.125]])
    torch.testing.assert_close(ref.rate_nats(lik), torch.tensor([3 * math.log(2), 3 * math.log(2)]))
    torch.testing.assert_close(ref.rate_bits(lik), torch.tensor([3.0, 3.0]))
    lik4 = torch.full((2, 3, 2, 2), 0.5)  # all non-batch dims summed
    torch.testing.assert_close(ref.rate_bits(lik4), torch.tensor([12.0, 12.0]))
    assert ref.rate_nats(lik.half()).dtype == torch.float32


def test_dequantize_hand_computed_and_none_mode():
    p = ref.init_params(2)
    y = torch.tensor([[0.4, 1.6], [-0.76, 0.2]])
    yh, _ = ref.entropy_bottleneck(y, p["matrices"], p["biases"], p["factors"],
                                   torch.tensor([0.25, -0.3]), mode="dequantize")
    # round(0.2 + 0.3) = round(0.5) = 0: torch.round is round-half-to-even, as CompressAI
    torch.testing.assert_close(yh, torch.tensor([[0.25, 1.7], [-0.75, -0.3]]))
    yh, lik = ref.entropy_bottleneck(y, p["matrices"], p["biases"], p["factors"], mode="none")
    assert torch.equal(yh, y)
    torch.testing.assert_close(lik, ref.likelihood(y, p["matrices"], p["biases"], p["factors"]), rtol=0, atol=0)


def test_lower_bound_gradient_rule():
    x = torch.tensor([1e-12, 1e-12, 0.3, 0.3, 1e-9], requires_grad=True)
    out = ref.lower_bound(x, 1e-9)
    torch.testing.assert_close(out.detach(), torch.tensor([1e-9, 1e-9, 0.3, 0.3, 1e-9]), rtol=0, atol=0)
    out.backward(torch.tensor([2.0, -1.0, 3.0, -4.0, 5.0]))
    # below the bound: only a negative grad (descent raises x) passes; at/above: all pass
    torch.testing.assert_close(x.grad, torch.tensor([0.0, -1.0, 3.0, -4.0, 5.0]), rtol=0, atol=0)
    assert ref.lower_bound(x, 0.0) is x


def test_lower_bound_in_likelihood_matches_compressai():
    ceb = _perturbed(2, seed=9)
    mats, bias, facs, _ = _leaf_params(ceb)
    yh = torch.tensor([[1e4, -1e4], [0.1, 1e4]], dtype=torch.float64, requires_grad=True)
    yh_c = yh.detach().clone().requires_grad_()
    lik = ref.likelihood(yh, mats, bias, facs)
    lik_c = ceb.likelihood_lower_bound(ceb._likelihood(yh_c.t().reshape(2, 1, -1))[0]).reshape(2, 2).t()
    assert (lik.detach()[[0, 0, 1], [0, 1, 1]] == 1e-9).all()
    g = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    lik.backward(g)
    lik_c.backward(g)
    torch.testing.assert_close(yh.grad, yh_c.grad, **TOL64)
    assert yh.grad[0, 0] == 0 and yh.grad[1, 1] == 0  # clamped, grad pushes down: blocked


# --------------------------------------------------------------------------- gradcheck (float64)
def _small_params(C=3, seed=10):
    ceb = _perturbed(C, seed=seed)
    mats, bias, facs, q = _leaf_params(ceb)
    return mats, bias, facs, q, ceb.target.double()


def _split(flat, n):
    return list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:])


def test_gradcheck_likelihood_and_noise_mode():
    mats, bias, facs, _, _ = _small_params()
    n = len(mats)
    y = (torch.randn(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
         ).requires_grad_()
    assert (ref.likelihood(y, mats, bias, facs) > 1e-4).all()  # away from the bound's kink

    def f_lik(y, *flat):
        return ref.likelihood(y, *_split(flat, n))

    def f_noise(y, *flat):
        return ref.entropy_bottleneck(y, *_split(flat, n), mode="noise", seed=3, offset=5)

    assert torch.autograd.gradcheck(f_lik, (y, *mats, *bias, *facs))
    assert torch.autograd.gradcheck(f_noise, (y, *mats, *bias, *facs))


def test_gradcheck_rate_and_aux_loss():
    mats, bias, facs, q, target = _small_params()
    lik = (0.1 + 0.8 * torch.rand(3, 2, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(ref.rate_nats, (lik,))
    assert torch.autograd.gradcheck(ref.rate_bits, (lik,))
    frozen = [[t.detach() for t in g] for g in (mats, bias, facs)]
    assert torch.autograd.gradcheck(lambda q: ref.aux_loss(q, *frozen, target), (q,))


# --------------------------------------------------------------------------- randomness, layout, dtypes
def test_noise_bits_equal_philox():
    p = ref.init_params(4)
    args = (p["matrices"], p["biases"], p["factors"])
    y = torch.zeros(3, 4, 5)
    for offset in (0, 123456789012):
        yh, _ = ref.entropy_bottleneck(y, *args, mode="noise", seed=42, offset=offset)
        assert torch.equal(yh, philox_noise((3, 4, 5), 42, offset))
    yh2, _ = ref.entropy_bottleneck(y, *args, mode="noise", seed=43)
    assert not torch.equal(yh2, philox_noise((3, 4, 5), 42, 0))


def test_non_contiguous_input_uses_logical_index():
    p = ref.init_params(4)
    args = (p["matrices"], p["biases"], p["factors"])
    base = 3 * torch.randn(5, 6, 4)
    y = base.permute(0, 2, 1)  # [5, 4, 6], not contiguous
    assert not y.is_contiguous()
    for mode in ("noise", "dequantize"):
        a = ref.entropy_bottleneck(y, *args, medians=ref.medians(p["quantiles"]), mode=mode, seed=7)
        b = ref.entropy_bottleneck(y.contiguous(), *args, medians=ref.medians(p["quantiles"]), mode=mode, seed=7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    p = ref.init_params(4)
    args = (p["matrices"], p["biases"], p["factors"])
    y = (3 * torch.randn(6, 4)).to(dtype)
    yh, lik = ref.entropy_bottleneck(y, *args, mode="noise", seed=11)
    yh32, lik32 = ref.entropy_bottleneck(y.float(), *args, mode="noise", seed=11)
    assert yh.dtype == dtype and lik.dtype == torch.float32
    assert torch.equal(yh, yh32.to(dtype)) and torch.equal(lik, lik32)


# --------------------------------------------------------------------------- edge cases
def test_empty_batch_gives_empty_outputs():
    p = ref.init_params(4)
    args = (p["matrices"], p["biases"], p["factors"])
    y = torch.zeros(0, 4, 3, requires_grad=True)
    for mode in ("noise", "dequantize", "none"):
        yh, lik = ref.entropy_bottleneck(y, *args, ref.medians(p["quantiles"]), mode=mode)
        assert yh.shape == (0, 4, 3) and lik.shape == (0, 4, 3)
        r = ref.rate_nats(lik)
        assert r.shape == (0,)
    r.sum().backward()
    assert y.grad.shape == y.shape


def test_nan_propagates_per_sample():
    """No host-side NaN check (it would sync); NaN stays in its own sample."""
    p = ref.init_params(4)
    args = (p["matrices"], p["biases"], p["factors"])
    y = torch.randn(3, 4)
    y[1, 2] = float("nan")
    yh, lik = ref.entropy_bottleneck(y, *args, ref.medians(p["quantiles"]), mode="dequantize")
    assert torch.isnan(yh[1, 2]) and torch.isnan(lik[1, 2])
    r = ref.rate_nats(lik)
    assert torch.isnan(r[1]) and torch.isfinite(r[[0, 2]]).all()
    _, lik_ok = ref.entropy_bottleneck(y[[0, 2]], *args, ref.medians(p["quantiles"]), mode="dequantize")
    assert torch.equal(lik[[0, 2]], lik_ok)


def test_bad_inputs_raise_clear_errors():
    p = ref.init_params(4)
    args = (p["matrices"], p["biases"], p["factors"])
    med = ref.medians(p["quantiles"])
    with pytest.raises(ValueError, match="y must be .* at least 2 dims"):
        ref.entropy_bottleneck(torch.zeros(4), *args)
    with pytest.raises(ValueError, match="y has 3 channels"):
        ref.entropy_bottleneck(torch.zeros(2, 3), *args)
    with pytest.raises(TypeError, match="y must have a floating dtype"):
        ref.entropy_bottleneck(torch.zeros(2, 4, dtype=torch.int64), *args)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        ref.entropy_bottleneck([[0.0] * 4], *args)
    with pytest.raises(ValueError, match="y is on meta"):
        ref.entropy_bottleneck(torch.zeros(2, 4, device="meta"), *args)
    with pytest.raises(ValueError, match="y_hat has 5 channels"):
        ref.likelihood(torch.zeros(2, 5), *args)
    with pytest.raises(ValueError, match="mode"):
        ref.entropy_bottleneck(torch.zeros(2, 4), *args, mode="round")
    with pytest.raises(ValueError, match="needs medians"):
        ref.entropy_bottleneck(torch.zeros(2, 4), *args, mode="dequantize")
    with pytest.raises(ValueError, match="medians must be"):
        ref.entropy_bottleneck(torch.zeros(2, 4), *args, med[:3], mode="dequantize")
    with pytest.raises(ValueError, match="seed"):
        ref.entropy_bottleneck(torch.zeros(2, 4), *args, seed=-1)
    with pytest.raises(ValueError, match="len\\(factors\\)"):
        ref.likelihood(torch.zeros(2, 4), p["matrices"], p["biases"], p["factors"][:-1])
    with pytest.raises(ValueError, match="matrices\\[1\\]"):
        ref.likelihood(torch.zeros(2, 4), [p["matrices"][0], p["matrices"][1][:, :, :2]] + p["matrices"][2:],
                       p["biases"], p["factors"])
    with pytest.raises(ValueError, match="quantiles must be"):
        ref.medians(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="quantiles has 3 channels"):
        ref.aux_loss(p["quantiles"][:3], *args, p["target"])


# --------------------------------------------------------------------------- module
def test_state_dict_round_trip_with_compressai():
    ceb = _perturbed(5, seed=12, dtype=torch.float32).eval()
    m = EntropyBottleneck(5).eval()
    m.load_state_dict(ceb.state_dict(), strict=True)
    y = _y((4, 5, 3), seed=13, scale=2.0, dtype=torch.float32)
    yh, lik = m(y)
    yh_c, lik_c = ceb(y)
    torch.testing.assert_close(yh, yh_c, rtol=0, atol=0)
    torch.testing.assert_close(lik, lik_c, rtol=1e-4, atol=1e-6)  # float32, two algebraic forms
    back = CEB(5)
    back.load_state_dict(m.state_dict(), strict=True)
    for k, v in ceb.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_state_dict_legacy_keys_coder_buffers_and_bound():
    ceb = _perturbed(3, seed=14, dtype=torch.float32, likelihood_bound=1e-6)
    ceb.update()
    sd = ceb.state_dict()
    legacy = {}
    for k, v in sd.items():
        for new, old in (("matrices.", "_matrix"), ("biases.", "_bias"), ("factors.", "_factor")):
            if k.startswith(new):
                k = old + k[len(new):]
        legacy[k] = v
    assert "_matrix0" in legacy and "_quantized_cdf" in legacy
    m = EntropyBottleneck(3)
    m.load_state_dict(legacy, strict=True)
    assert m.likelihood_bound == pytest.approx(1e-6)
    for i in range(len(ceb.matrices)):
        assert torch.equal(m.matrices[i], ceb.matrices[i])
    assert torch.equal(m._quantized_cdf, ceb._quantized_cdf) and torch.equal(m._offset, ceb._offset)
    nobound = EntropyBottleneck(3, likelihood_bound=0)
    nobound.load_state_dict(sd, strict=True)  # CompressAI's bound buffer is accepted and ignored
    assert nobound.likelihood_bound == 0.0


def test_update_matches_compressai():
    ceb = _perturbed(4, seed=15, dtype=torch.float32)
    m = EntropyBottleneck(4)
    m.load_state_dict(ceb.state_dict())
    assert ceb.update() and m.update()
    assert not m.update()  # already filled
    assert torch.equal(m._offset, ceb._offset) and torch.equal(m._cdf_length, ceb._cdf_length)
    assert torch.equal(m._quantized_cdf, ceb._quantized_cdf)


def test_update_quantiles_solves_targets():
    m = EntropyBottleneck(3)
    m.update(update_quantiles=True)
    assert m.loss().item() < 1e-2


def test_module_forward_train_eval_and_seed():
    ceb = _perturbed(4, seed=16, dtype=torch.float32)
    m = EntropyBottleneck(4, backend="reference")  # exact: the module is the reference here
    m.load_state_dict(ceb.state_dict())
    y = torch.randn(3, 4, 2)
    p = (list(m.matrices), list(m.biases), list(m.factors))
    yh, lik = m(y, seed=5, offset=9)
    e_yh, e_lik = ref.entropy_bottleneck(y, *p, mode="noise", seed=5, offset=9)
    assert torch.equal(yh, e_yh) and torch.equal(lik, e_lik)
    torch.manual_seed(1)
    a = m(y)[0]
    torch.manual_seed(1)
    b = m(y)[0]
    c = m(y)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    m.eval()
    yh, lik = m(y)
    e_yh, e_lik = ref.entropy_bottleneck(y, *p, m.medians(), mode="dequantize")
    assert torch.equal(yh, e_yh) and torch.equal(lik, e_lik)
    assert torch.equal(m(y, training=True, seed=5, offset=9)[0], m.train()(y, seed=5, offset=9)[0])
    torch.testing.assert_close(m.rate(lik), ref.rate_nats(lik), rtol=0, atol=0)
    torch.testing.assert_close(m.loss(), ceb.loss(), rtol=1e-5, atol=1e-4)


def test_module_backend_and_input_checks():
    y = torch.randn(2, 4)
    assert EntropyBottleneck(4, backend="reference")(y, seed=1)[0].shape == y.shape
    assert EntropyBottleneck(4, backend="auto")(y, seed=1)[0].shape == y.shape
    with pytest.raises(BackendUnavailableError, match="entropy_bottleneck.*cuda"):
        EntropyBottleneck(4, backend="cuda")(y, seed=1)  # CPU tensor
    with pytest.raises(ValueError, match="backend"):
        EntropyBottleneck(4, backend="fast")
    m = EntropyBottleneck(4)
    with pytest.raises(ValueError, match="y has 3 channels"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="y is on meta"):
        m(torch.randn(2, 4, device="meta"))
