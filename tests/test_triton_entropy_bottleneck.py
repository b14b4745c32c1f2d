# SPDX-License-Identifier: Apache-2.0
"""The fused Triton entropy bottleneck (forward and backward launchers) against the reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (numpy, slow), so shapes stay small.
Bits (noise, masks, y_hat) are exact; likelihoods, rates and gradients are compared with
fp32 tolerances; float16/bfloat16 inputs follow the flash-attention rule.
"""
import pytest
import torch

from cifd_kernels.reference import entropy_bottleneck as ref
from cifd_kernels.reference.ibm import ibm
from cifd_kernels.reference.philox import philox_keep_mask, philox_noise
from cifd_kernels.backend import get_kernel_options, kernel_options, set_kernel_options
from cifd_kernels.ops import density_pack as P_ops
from helpers import backend_or_skip

SHAPES = [(1, 1), (7, 3), (33, 193), (2, 5, 3, 4)]
SEED, OFFSET = 2**40 + 7, 2**32 - 50  # both Philox key words used; the counter carries into word 1
# Likelihoods and rates: fp32 tolerance for values the kernel and the reference compute with
# different (exp-based) tanh/sigmoid formulas and summation orders.
TOL = dict(rtol=2e-5, atol=2e-5)
# Gradients sum over N*S elements terms scaled by -g/p, which is ill-conditioned where p is
# small: the float32 reference itself is off from float64 by ~1e-4 on values ~10. So gradients
# follow flash-attention's rule against a float64 gold, |kernel - gold| <= K |ref32 - gold| + eps,
# with K = 4 rather than 2: kernel and reference are both float32 with different, equally
# accurate tanh/sigmoid formulas and sum orders, and the maxima of two such error fields over
# a few hundred elements were measured to differ by up to ~4x either way.
FLASH_K = 4.0
EPS = 1e-5


def _T(device):
    backend_or_skip("triton", device)
    from cifd_kernels._triton import entropy_bottleneck as T
    return T


def _params(C, device, seed=0):
    """Leaf parameters perturbed far from the init (as after training), and medians [C]."""
    g = torch.Generator().manual_seed(seed + 10)
    p = ref.init_params(C, generator=g)
    out = {}
    for name, scale in (("matrices", 0.4), ("biases", 0.5), ("factors", 1.0)):
        out[name] = [(t + scale * torch.randn(t.shape, generator=g)).to(device).requires_grad_()
                     for t in p[name]]
    out["medians"] = (0.3 * torch.randn(C, generator=g)).to(device).requires_grad_()
    return out


def _y(shape, device, scale=3.0, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = scale * torch.randn(shape, generator=g)
    return y.to(device=device, dtype=dtype)


def _reference(y, P, mode, rho, s, need_lik):
    """(y_hat, rate, likelihood or None) from the reference, differentiable."""
    m, b, f = P["matrices"], P["biases"], P["factors"]
    if mode == "noise":
        yh, rate, _ = ibm(y, m, b, f, rho=rho, s=s, seed=SEED, offset=OFFSET)
        lik = ref.likelihood(yh.float() / s, m, b, f) if need_lik else None  # read at y_hat / s
    else:
        yh, lik = ref.entropy_bottleneck(y, m, b, f, P["medians"], mode=mode)
        rate = ref.rate_nats(lik)
    return yh, rate, lik


def _leaves(y, P, mode):
    return [y] + P["matrices"] + P["biases"] + P["factors"] + ([P["medians"]] if mode == "dequantize" else [])


def _kernel(T, y, P, mode, rho, s, need_lik, grads, row_programs=None):
    """Forward and backward through the launchers; gradients in the reference's leaf order."""
    m, b, f = P["matrices"], P["biases"], P["factors"]
    packed = P_ops.pack_density(m, b, f)
    med = P["medians"].detach()
    kw = dict(mode=mode, seed=SEED, offset=OFFSET, rho=rho, s=s)
    yh, rate, lik = T.entropy_bottleneck_fwd(y.detach(), packed, med, need_likelihood=need_lik, **kw)
    gyh, grate, glik = grads
    gy, gp, gmed = T.entropy_bottleneck_bwd(y.detach(), packed, med, gyh, grate, glik,
                                            row_programs=row_programs, **kw)
    gm, gb, gf = P_ops.unpack_density_grad(gp, m, b, f)
    g = [gy] + gm + gb + gf + ([gmed] if mode == "dequantize" else [])
    return yh, rate, lik, g


def _random_grads(y, need_lik, seed=5):
    g = torch.Generator().manual_seed(seed)
    gyh = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    grate = torch.randn(y.shape[0], generator=g).to(y.device)
    glik = torch.randn(y.shape, generator=g).to(y.device) if need_lik else None
    return gyh, grate, glik


def _gold_grads(y, P, mode, rho, s, grads):
    """Reference gradients in float64 (parameters, y and incoming gradients upcast)."""
    P64 = {k: ([t.detach().double().requires_grad_() for t in v] if isinstance(v, list)
               else v.detach().double().requires_grad_()) for k, v in P.items()}
    y64 = y.detach().double().requires_grad_()
    return _ref_grads(y64, P64, mode, rho, s, tuple(None if t is None else t.double() for t in grads))


def _flash_close(out, out_ref, gold, eps=EPS):
    """flash-attention's rule: |out - gold| <= K |out_ref - gold| + eps max(1, |gold|) (maxima)."""
    out, out_ref, gold = out.double(), out_ref.double(), gold.double()
    if gold.numel() == 0:
        return
    bound = FLASH_K * (out_ref - gold).abs().max().item() + eps * max(1.0, gold.abs().max().item())
    err = (out - gold).abs().max().item()
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g} (reference error {(out_ref - gold).abs().max():.3g})"


def _ref_grads(y, P, mode, rho, s, grads):
    gyh, grate, glik = grads
    yh, rate, lik = _reference(y, P, mode, rho, s, glik is not None)
    loss = (yh.float() * gyh.float()).sum() + (rate * grate).sum()
    if glik is not None:
        loss = loss + (lik * glik).sum()
    out = torch.autograd.grad(loss, _leaves(y, P, mode), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, _leaves(y, P, mode))]


# --------------------------------------------------------------------------- bits
@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3, 4)])
def test_noise_and_mask_bits_exact(shape, device):
    T = _T(device)
    P = _params(shape[1], device)
    packed = P_ops.pack_density(P["matrices"], P["biases"], P["factors"])
    zeros = torch.zeros(shape, device=device)
    yh, _, _ = T.entropy_bottleneck_fwd(zeros, packed, mode="noise", seed=SEED, offset=OFFSET)
    assert torch.equal(yh.cpu(), philox_noise(shape, SEED, OFFSET))  # 0 + 1*u = u
    big = torch.full(shape, 1000.0, device=device)
    yh, _, _ = T.entropy_bottleneck_fwd(big, packed, mode="noise", seed=SEED, offset=OFFSET, rho=0.5)
    assert torch.equal((yh != 0).cpu(), philox_keep_mask(shape, SEED, OFFSET, 0.5))


# --------------------------------------------------------------------------- fp32 against the reference
NOISE_CASES = [(rho, s) for rho in (0.0, 0.25, 0.9) for s in (1.0, 0.5)]
CASES = [("noise", rho, s) for rho, s in NOISE_CASES] + [("dequantize", 0.0, 1.0), ("none", 0.0, 1.0)]


@pytest.mark.parametrize("mode,rho,s", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, mode, rho, s, device):
    T = _T(device)
    P = _params(shape[1], device)
    y = _y(shape, device).requires_grad_()
    need_lik = rho in (0.0, 0.9) and s == 1.0  # the likelihood output and its gradient, some cases
    grads = _random_grads(y, need_lik)
    yh_r, rate_r, lik_r = _reference(y, P, mode, rho, s, need_lik)
    g_r = _ref_grads(y, P, mode, rho, s, grads)
    g_gold = _gold_grads(y, P, mode, rho, s, grads)
    yh, rate, lik, g = _kernel(T, y, P, mode, rho, s, need_lik, grads)
    assert yh.dtype == y.dtype and yh.shape == y.shape
    assert torch.equal(yh, yh_r.detach())  # bit for bit
    assert rate.dtype == torch.float32 and rate.shape == (shape[0],)
    torch.testing.assert_close(rate, rate_r.detach(), **TOL)
    if need_lik:
        torch.testing.assert_close(lik, lik_r.detach(), **TOL)
    for a, b, c in zip(g, g_r, g_gold):
        assert a.shape == b.shape and a.dtype == b.dtype
        _flash_close(a, b, c.to(a.device))


# --------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,rho,s", [("noise", 0.25, 0.5), ("dequantize", 0.0, 1.0)])
@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3, 4)])
def test_low_precision(shape, mode, rho, s, dtype, device):
    T = _T(device)
    P = _params(shape[1], device)
    y_lp = _y(shape, device, dtype=dtype).requires_grad_()
    y32 = y_lp.detach().float().requires_grad_()
    grads = _random_grads(y_lp, False)
    grads32 = (grads[0].float(), grads[1], None)
    yh_lp, rate_lp, _ = _reference(y_lp, P, mode, rho, s, False)
    g_lp = _ref_grads(y_lp, P, mode, rho, s, grads)
    _, rate32, _ = _reference(y32, P, mode, rho, s, False)
    g_gold = _gold_grads(y32, P, mode, rho, s, grads32)  # the same (upcast) inputs, in float64
    yh, rate, _, g = _kernel(T, y_lp, P, mode, rho, s, False, grads)
    assert yh.dtype == dtype and g[0].dtype == dtype
    assert torch.equal(yh, yh_lp.detach())  # the float32 y_hat rounded once, as the reference
    _flash_close(rate, rate_lp.detach(), rate32.detach(), eps=TOL["rtol"] * rate32.abs().max().item())
    for a, b, c in zip(g, g_lp, g_gold):
        assert a.dtype == b.dtype
        _flash_close(a, b, c.to(a.device))


# --------------------------------------------------------------------------- extremes, determinism
@pytest.mark.parametrize("mode", ["noise", "dequantize", "none"])
def test_extreme_inputs(mode, device):
    T = _T(device)
    shape = (6, 4, 5)
    P = _params(shape[1], device)
    y = _y(shape, device, scale=30.0)
    y[0] = 1e4
    y[1] = -1e4
    y[2, :, ::2] = 3e3
    y.requires_grad_()
    grads = _random_grads(y, True)
    yh, rate, lik, g = _kernel(T, y, P, mode, 0.25 if mode == "noise" else 0.0, 1.0, True, grads)
    for t in [yh, rate, lik] + g:
        assert torch.isfinite(t).all()
    assert (lik >= 1e-9).all() and (lik <= 1).all()
    yh_r, rate_r, lik_r = _reference(y, P, mode, 0.25 if mode == "noise" else 0.0, 1.0, True)
    assert torch.equal(yh, yh_r.detach())
    torch.testing.assert_close(rate, rate_r.detach(), **TOL)
    torch.testing.assert_close(lik, lik_r.detach(), **TOL)
    g_r = _ref_grads(y, P, mode, 0.25 if mode == "noise" else 0.0, 1.0, grads)
    g_gold = _gold_grads(y, P, mode, 0.25 if mode == "noise" else 0.0, 1.0, grads)
    for a, b, c in zip(g, g_r, g_gold):
        _flash_close(a, b, c.to(a.device))


@pytest.mark.parametrize("mode", ["noise", "dequantize"])
@pytest.mark.parametrize("shape", [(33, 193), (3, 5, 3, 4)])
def test_row_programs_change_only_the_summation_order(shape, mode, device):
    """The backward's parameter gradients are per-program partials summed in a fixed
    order: another program count sums the same terms in another order (fp32 rounding
    only), the same count gives the same bits run to run."""
    T = _T(device)
    P = _params(shape[1], device)
    y = _y(shape, device)
    grads = _random_grads(y, True)
    args = (T, y, P, mode, 0.25 if mode == "noise" else 0.0, 1.0, True, grads)
    yh0, rate0, lik0, g0 = _kernel(*args)  # the launcher's own program count
    yh1, rate1, lik1, g1 = _kernel(*args, row_programs=3)
    yh2, rate2, lik2, g2 = _kernel(*args, row_programs=3)
    assert torch.equal(yh0, yh1) and torch.equal(lik0, lik1) and torch.equal(rate0, rate1)
    for a, b in zip(g1, g0):  # both are fp32 sums of the same terms in different orders
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert torch.equal(rate1, rate2)  # run to run, bit for bit
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_no_grad_inputs_and_empty_batch(device):
    T = _T(device)
    P = _params(3, device)
    packed = P_ops.pack_density(P["matrices"], P["biases"], P["factors"])
    y = _y((5, 3), device)
    gy, gp, gmed = T.entropy_bottleneck_bwd(y, packed, None, None, None, None, mode="none")
    assert gmed is None and not gp.any() and not gy.any()
    e = torch.zeros((0, 3), device=device)
    yh, rate, lik = T.entropy_bottleneck_fwd(e, packed, need_likelihood=True)
    assert yh.shape == (0, 3) and rate.shape == (0,) and lik.shape == (0, 3)


def test_rejects_what_it_does_not_handle(device):
    T = _T(device)
    P = _params(3, device)
    assert P_ops.supports(P["matrices"])
    q = ref.init_params(3, filters=(2, 4))
    assert not P_ops.supports(q["matrices"])
    with pytest.raises(ValueError):
        P_ops.pack_density(q["matrices"], q["biases"], q["factors"])
    packed = P_ops.pack_density(P["matrices"], P["biases"], P["factors"])
    with pytest.raises(TypeError):
        T.entropy_bottleneck_fwd(_y((2, 3), device, dtype=torch.float64), packed)
    with pytest.raises(ValueError):
        T.entropy_bottleneck_fwd(_y((2, 3), device), packed, mode="dequantize")  # no medians
    with pytest.raises(ValueError):
        T.entropy_bottleneck_fwd(_y((2, 3), device), packed, mode="round")


def test_backward_register_cap_knob(device, monkeypatch):
    """The triton_bwd_maxnreg kernel option (the GPU check's register-cap experiment):
    None adds no launch option, a cap becomes Triton's maxnreg on a GPU (nothing under
    the interpreter), a bad value is refused where it is set, naming the option, and
    changes nothing; with a cap the backward still gives the uncapped bits."""
    T = _T(device)
    assert get_kernel_options().triton_bwd_maxnreg is None
    assert T._bwd_launch_options() == {}
    with kernel_options(triton_bwd_maxnreg=168):
        monkeypatch.setattr(T, "_interpret", lambda: False)
        assert T._bwd_launch_options() == {"maxnreg": 168}
        monkeypatch.setattr(T, "_interpret", lambda: True)
        assert T._bwd_launch_options() == {}
    monkeypatch.undo()
    for bad in ("168", 16, 300, -1, True, 168.0):
        with pytest.raises((ValueError, TypeError), match="triton_bwd_maxnreg"):
            set_kernel_options(triton_bwd_maxnreg=bad)
        assert get_kernel_options().triton_bwd_maxnreg is None
    P = _params(5, device)
    packed = P_ops.pack_density(P["matrices"], P["biases"], P["factors"])
    y, g = _y((9, 5), device), _y((9, 5), device, seed=2)
    gr = torch.ones(9, device=device)
    base = T.entropy_bottleneck_bwd(y, packed, None, g, gr, None, "noise", 3, 4)
    with kernel_options(triton_bwd_maxnreg=128):
        capped = T.entropy_bottleneck_bwd(y, packed, None, g, gr, None, "noise", 3, 4)
    assert torch.equal(base[0], capped[0]) and torch.equal(base[1], capped[1])
