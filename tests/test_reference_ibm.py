# SPDX-License-Identifier: Apache-2.0
"""The IBM reference and module: Philox bits exactly, rate against CompressAI's density."""
import pytest
import torch

from helpers import perturbed_compressai_eb

from cifd_kernels.backend import BackendUnavailableError
from cifd_kernels.nn.ibm import IBM
from cifd_kernels.reference import entropy_bottleneck as ref_eb
from cifd_kernels.reference.ibm import ibm
from cifd_kernels.reference.philox import philox_keep_mask, philox_noise

compressai_em = pytest.importorskip("compressai.entropy_models")
CEB = compressai_em.EntropyBottleneck

TOL64 = dict(rtol=1e-6, atol=1e-12)


def _perturbed(C, seed=0, dtype=torch.float64):
    return perturbed_compressai_eb(C, seed, dtype, quantiles=False)


def _leaf(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _params(C, seed=0, dtype=torch.float32):
    p = ref_eb.init_params(C, generator=torch.Generator().manual_seed(seed))
    return [[t.to(dtype) for t in p[k]] for k in ("matrices", "biases", "factors")]


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.9])
@pytest.mark.parametrize("s", [1.0, 0.37])
def test_mask_and_noise_exact(rho, s):
    shape, seed, offset = (9, 7), 2024, 31
    w = torch.randn(shape)
    w_hat, rate, keep = ibm(w, *_params(7), rho=rho, s=s, seed=seed, offset=offset)
    expect_keep = philox_keep_mask(shape, seed, offset, rho)
    assert keep.dtype == torch.bool and torch.equal(keep, expect_keep)
    # order of operations: s*u first, then + w, dropped elements selected to +0.0
    su = torch.tensor(s, dtype=torch.float32) * philox_noise(shape, seed, offset)
    expect = torch.where(expect_keep, w + su, torch.zeros(()))
    assert torch.equal(w_hat, expect)
    assert not torch.signbit(w_hat[~keep]).any()  # +0.0, never -0.0
    assert rate.shape == (9,) and rate.dtype == torch.float32
    if rho == 0.0:
        assert keep.all()


def test_keep_fraction_and_extremes():
    w = torch.zeros(400, 100)
    for rho in (0.25, 0.9):
        _, _, keep = ibm(w, *_params(100), rho=rho, seed=5)
        assert abs(keep.float().mean().item() - (1 - rho)) < 0.01
    w_hat, rate, keep = ibm(w[:4], *_params(100), rho=1.0, seed=5)
    assert not keep.any() and torch.equal(rate, torch.zeros(4)) and not w_hat.any()


@pytest.mark.parametrize("rho,s", [(0.0, 1.0), (0.25, 0.6), (0.9, 1.3)])
def test_rate_and_gradients_match_compressai(rho, s):
    B, C, seed, offset = 6, 8, 99, 1000
    ceb = _perturbed(C, seed=3)
    mats, bias, facs = _leaf(ceb.matrices), _leaf(ceb.biases), _leaf(ceb.factors)
    w = (4 * torch.randn(B, C, dtype=torch.float64)).requires_grad_()
    w_hat, rate, keep = ibm(w, mats, bias, facs, rho=rho, s=s, seed=seed, offset=offset)
    assert rate.dtype == torch.float64

    # METHOD sec. 3 written out with CompressAI's density (its [C, 1, N] layout), read
    # at w_hat / s: the unit-width channel's rate.
    w_c = w.detach().clone().requires_grad_()
    u = philox_noise((B, C), seed, offset).double()
    wh_c = torch.where(keep, w_c + s * u, torch.zeros((), dtype=torch.float64))
    x_c = (wh_c / s).t().reshape(C, 1, B)
    lik_c = ceb.likelihood_lower_bound(ceb._likelihood(x_c)[0]).reshape(C, B).t()
    rate_c = -(keep * torch.log(lik_c)).sum(1)
    torch.testing.assert_close(w_hat, wh_c, rtol=0, atol=1e-15)
    torch.testing.assert_close(rate, rate_c, **TOL64)

    g1, g2 = torch.randn_like(w_hat), torch.randn_like(rate)
    torch.autograd.backward((w_hat, rate), (g1, g2))
    torch.autograd.backward((wh_c, rate_c), (g1, g2))
    for a, b in zip([w, *mats, *bias, *facs], [w_c, *ceb.matrices, *ceb.biases, *ceb.factors]):
        torch.testing.assert_close(a.grad, b.grad, **TOL64)
    assert torch.equal(w.grad[~keep], torch.zeros_like(w.grad[~keep]))  # dropped: no gradient


@pytest.mark.parametrize("rho", [0.0, 0.3])
@pytest.mark.parametrize("s", [0.3, 2.5])
def test_scaled_channel_is_the_unit_channel_of_w_over_s(rho, s):
    """IBM_s(w) = s * IBM_1(w / s): the same keep mask, w_hat scaled by s, the same rate
    (docs/METHOD.md sec. 3). In float64 the two sides round differently only in the last
    bits of w_hat / s versus w / s + u (a few ulps of |w / s| + 1/2)."""
    mats, bias, facs = _params(5, seed=2, dtype=torch.float64)
    w = 3 * torch.randn(7, 5, dtype=torch.float64)
    wh_s, rate_s, keep_s = ibm(w, mats, bias, facs, rho=rho, s=s, seed=11, offset=5)
    wh_1, rate_1, keep_1 = ibm(w / s, mats, bias, facs, rho=rho, s=1.0, seed=11, offset=5)
    assert torch.equal(keep_s, keep_1)
    torch.testing.assert_close(wh_s, s * wh_1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rate_s, rate_1, rtol=1e-10, atol=1e-10)


def test_rate_grows_as_s_shrinks():
    """With the density read at w_hat / s, a finer noise (smaller s) carries more
    information about w, so the rate of the same w rises (the old reading, at w_hat
    with unit bins, had it fall towards 0)."""
    mats, bias, facs = _params(8, seed=1, dtype=torch.float64)
    w = 2 * torch.randn(64, 8, dtype=torch.float64)
    rates = [ibm(w, mats, bias, facs, s=s, seed=3)[1].mean().item() for s in (1.0, 0.3, 0.1)]
    assert rates[0] < rates[1] < rates[2], rates


def test_gradcheck_ibm():
    mats, bias, facs = (_leaf(g) for g in _params(3, seed=4, dtype=torch.float64))
    n = len(mats)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def f(w, *flat):
        w_hat, rate, _ = ibm(w, list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:]),
                             rho=0.25, s=0.7, seed=8, offset=3)
        return w_hat, rate
    _, _, keep = ibm(w, mats, bias, facs, rho=0.25, seed=8, offset=3)
    assert keep.any() and not keep.all()
    assert torch.autograd.gradcheck(f, (w, *mats, *bias, *facs))


def test_inference_removes_ibm():
    w = torch.randn(5, 4)
    w_hat, rate, keep = ibm(w, *_params(4), rho=0.5, s=2.0, training=False)
    assert w_hat is w and keep is None
    assert torch.equal(rate, torch.zeros(5))


def test_non_contiguous_and_spatial_inputs():
    p = _params(4)
    base = torch.randn(4, 6)
    w = base.t()  # [6, 4], not contiguous
    a = ibm(w, *p, rho=0.25, seed=1)
    b = ibm(w.contiguous(), *p, rho=0.25, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    w4 = torch.randn(2, 4, 3, 3)
    w_hat, rate, keep = ibm(w4, *p, rho=0.25, seed=1)
    assert w_hat.shape == keep.shape == w4.shape and rate.shape == (2,)


def test_low_precision_input():
    w = torch.randn(3, 4).to(torch.bfloat16)
    w_hat, rate, _ = ibm(w, *_params(4), rho=0.25, s=0.5, seed=6)
    w_hat32, rate32, _ = ibm(w.float(), *_params(4), rho=0.25, s=0.5, seed=6)
    assert w_hat.dtype == torch.bfloat16 and rate.dtype == torch.float32
    assert torch.equal(w_hat, w_hat32.to(torch.bfloat16)) and torch.equal(rate, rate32)


def test_empty_batch_and_nan():
    p = _params(4)
    w_hat, rate, keep = ibm(torch.zeros(0, 4), *p, rho=0.5)
    assert w_hat.shape == (0, 4) and rate.shape == (0,) and keep.shape == (0, 4)
    w = torch.randn(3, 4)
    w[1, 0] = float("nan")
    w_hat, rate, _ = ibm(w, *p, rho=0.0, seed=2)  # NaN propagates, in its own sample only
    assert torch.isnan(w_hat[1, 0]) and torch.isnan(rate[1]) and torch.isfinite(rate[[0, 2]]).all()
    w_hat, rate, keep = ibm(w, *p, rho=0.9, seed=2)
    assert not keep[1, 0] and w_hat[1, 0] == 0  # a dropped NaN is selected away


def test_bad_inputs_raise_clear_errors():
    p = _params(4)
    with pytest.raises(ValueError, match="w must be .* at least 2 dims"):
        ibm(torch.zeros(4), *p)
    with pytest.raises(ValueError, match="w has 5 channels"):
        ibm(torch.zeros(2, 5), *p)
    with pytest.raises(TypeError, match="w must have a floating dtype"):
        ibm(torch.zeros(2, 4, dtype=torch.int32), *p)
    with pytest.raises(ValueError, match="w is on meta"):
        ibm(torch.zeros(2, 4, device="meta"), *p)
    with pytest.raises(ValueError, match="rho"):
        ibm(torch.zeros(2, 4), *p, rho=1.5)
    for bad_s in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="s \\(noise scale\\) must be finite and > 0"):
            ibm(torch.zeros(2, 4), *p, s=bad_s)
    with pytest.raises(TypeError, match="rho"):
        ibm(torch.zeros(2, 4), *p, rho=torch.tensor(0.1))
    with pytest.raises(ValueError, match="offset"):
        ibm(torch.zeros(2, 4), *p, offset=-3)


def test_module():
    ceb = _perturbed(6, seed=7, dtype=torch.float32)
    m = IBM(6, rho=0.25, s=0.8, backend="reference")  # exact: the module is the reference here
    m.load_state_dict(ceb.state_dict(), strict=True)  # CompressAI layout
    w = torch.randn(5, 6)
    w_hat, rate = m(w, seed=12, offset=4)
    e_hat, e_rate, _ = ibm(w, list(m.matrices), list(m.biases), list(m.factors), rho=0.25, s=0.8,
                           seed=12, offset=4)
    assert torch.equal(w_hat, e_hat) and torch.equal(rate, e_rate)
    torch.manual_seed(0)
    a = m(w)[0]
    torch.manual_seed(0)
    assert torch.equal(a, m(w)[0])
    m.eval()
    w_hat, rate = m(w)
    assert w_hat is w and torch.equal(rate, torch.zeros(5))
    with pytest.raises(BackendUnavailableError, match="entropy_bottleneck.*cuda"):
        IBM(6, backend="cuda").train()(w, seed=1)
    with pytest.raises(ValueError, match="rho"):
        IBM(6, rho=-0.1)
    for bad_s in (-1.0, 0.0, float("inf")):  # issue 13: IBM(16, s=-1.0) was accepted
        with pytest.raises(ValueError, match="s \\(noise scale\\) must be finite and > 0"):
            IBM(16, s=bad_s)
    with pytest.raises(ValueError, match="w has 6 channels"):
        IBM(5)(w)
