# SPDX-License-Identifier: Apache-2.0
"""cifd::entropy_bottleneck through the public op and the modules, every kernel
backend against the reference: y_hat exact (same Philox bits), rates, likelihoods
and all gradients within fp32 tolerance; opcheck; torch.compile; errors."""

import importlib

import pytest
import torch

from cifd_kernels.backend import set_kernel_options
from cifd_kernels import BackendUnavailableError
from cifd_kernels.nn import IBM, EntropyBottleneck
from cifd_kernels.ops import entropy_bottleneck
from cifd_kernels.reference import entropy_bottleneck as ref
from helpers import backend_or_skip

KERNELS = ["triton", "cpu", "cuda"]


def _skip_unless(be, device):
    if (be == "cuda") != (device == "cuda") and be != "triton":
        pytest.skip(f"{be} kernels do not take {device} tensors")
    backend_or_skip(be, device)
    from cifd_kernels import backend
    if be not in backend.implemented("entropy_bottleneck"):
        pytest.skip(f"{be} entropy_bottleneck kernels not registered in this build")


def _params(C, device, seed=0):
    """Non-trivial density parameters: CompressAI's init perturbed as training would."""
    g = torch.Generator().manual_seed(seed)
    p = ref.init_params(C, generator=g)
    def jit(t, scale):
        return (t + scale * torch.randn(t.shape, generator=g)).to(device).requires_grad_()
    mats = [jit(m, 0.5) for m in p["matrices"]]
    bias = [jit(b, 0.5) for b in p["biases"]]
    facs = [jit(f, 0.8) for f in p["factors"]]
    quant = (p["quantiles"] + 0.3 * torch.randn(p["quantiles"].shape, generator=g)).to(device)
    return mats, bias, facs, ref.medians(quant).detach().requires_grad_()


def _run(be, y, mats, bias, facs, med, mode, rho, s, seed, g_yhat, g_rate, g_lik):
    out = entropy_bottleneck(y, mats, bias, facs, med if mode == "dequantize" else None, mode=mode,
                             seed=seed, offset=11, rho=rho, s=s, need_likelihood=True, backend=be)
    loss = (out.y_hat.float() * g_yhat).sum() + (out.rate * g_rate).sum() + (out.likelihood * g_lik).sum()
    wrt = [y] + mats + bias + facs + ([med] if mode == "dequantize" else [])
    return out, torch.autograd.grad(loss, wrt)


CASES = [("noise", 0.0, 1.0), ("noise", 0.25, 0.5), ("noise", 0.9, 1.0), ("dequantize", 0.0, 1.0),
         ("none", 0.0, 1.0)]


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("mode,rho,s", CASES)
@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3, 4), (1, 1)])
def test_matches_reference(be, mode, rho, s, shape, device):
    _skip_unless(be, device)
    C = shape[1]
    mats, bias, facs, med = _params(C, device)
    gen = torch.Generator().manual_seed(1)
    y = (4 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
    g_yhat = torch.randn(shape, generator=gen).to(device)
    g_rate = torch.randn(shape[0], generator=gen).to(device)
    g_lik = torch.randn(shape, generator=gen).to(device)
    want, gwant = _run("reference", y, mats, bias, facs, med, mode, rho, s, 5, g_yhat, g_rate, g_lik)
    got, ggot = _run(be, y, mats, bias, facs, med, mode, rho, s, 5, g_yhat, g_rate, g_lik)
    assert torch.equal(got.y_hat, want.y_hat)  # same Philox bits, same rounding
    torch.testing.assert_close(got.rate, want.rate.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.likelihood, want.likelihood.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ggot, gwant):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_flash_attention_rule(be, dtype, device):
    """Error vs the fp32 reference at most 2x (+eps) the reference's own error in dtype."""
    _skip_unless(be, device)
    mats, bias, facs, _ = _params(6, device)
    y32 = 3 * torch.randn(9, 6, generator=torch.Generator().manual_seed(2)).to(device)
    exact = entropy_bottleneck(y32, mats, bias, facs, seed=3, backend="reference")
    half_ref = entropy_bottleneck(y32.to(dtype), mats, bias, facs, seed=3, backend="reference")
    half_ker = entropy_bottleneck(y32.to(dtype), mats, bias, facs, seed=3, backend=be)
    assert half_ker.y_hat.dtype == dtype and half_ker.rate.dtype == torch.float32
    assert torch.equal(half_ker.y_hat, half_ref.y_hat)
    err_ref = (half_ref.rate - exact.rate).abs().max().item()
    err_ker = (half_ker.rate - exact.rate).abs().max().item()
    assert err_ker <= 2 * err_ref + 1e-4


@pytest.mark.parametrize("be", KERNELS)
def test_extreme_inputs_finite(be, device):
    _skip_unless(be, device)
    mats, bias, facs, med = _params(4, device)
    y = torch.tensor([[1e4, -1e4, 0.0, 3e3], [-2e3, 5e2, 1e-7, -1e4]], device=device, requires_grad=True)
    for mode in ("noise", "dequantize"):
        out = entropy_bottleneck(y, mats, bias, facs, med, mode=mode, seed=1, backend=be)
        gy, *gp = torch.autograd.grad(out.rate.sum() + out.y_hat.sum(), [y] + mats + bias + facs)
        assert torch.isfinite(out.rate).all() and torch.isfinite(gy).all()
        assert all(torch.isfinite(g).all() for g in gp)
        # far in the tails the likelihood sits at the bound: rate = -ln(1e-9) per element
        assert out.rate.max() <= 4 * -torch.log(torch.tensor(1e-9)).item() + 1e-3


@pytest.mark.parametrize("be", KERNELS)
def test_deterministic_bits(be, device):
    _skip_unless(be, device)
    mats, bias, facs, _ = _params(5, device)
    y = torch.randn(33, 5, device=device, requires_grad=True)

    def grads():
        out = entropy_bottleneck(y, mats, bias, facs, seed=9, deterministic=True, backend=be)
        return torch.autograd.grad(out.rate.sum(), [y] + mats + bias + facs)
    a, b = grads(), grads()
    assert all(torch.equal(x, z) for x, z in zip(a, b))


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_from_saved_y_hat_gives_the_same_bits(be, dtype, device, monkeypatch):
    """Noise mode without masking saves y_hat and runs backward in mode none (no noise
    regenerated): the same bits as saving y and regenerating the noise, for every
    gradient, through the eager path and the registered ops."""
    _skip_unless(be, device)
    if dtype == torch.float64 and be != "cpu":
        pytest.skip("float64 runs on the C++ CPU kernel only")
    mats, bias, facs, _ = _params(6, device)
    mats, bias, facs = ([t.detach().to(dtype).requires_grad_() for t in g] for g in (mats, bias, facs))
    gen = torch.Generator().manual_seed(3)
    y = (2 * torch.randn(37, 6, generator=gen)).to(device, dtype).requires_grad_()
    g_yhat = torch.randn(37, 6, generator=gen).to(device, dtype)
    g_rate = torch.randn(37, generator=gen).to(device)

    def grads():
        out = entropy_bottleneck(y, mats, bias, facs, seed=5, s=0.7, deterministic=True, backend=be)
        loss = (out.y_hat * g_yhat).sum() + (out.rate.to(dtype) * g_rate.to(dtype)).sum()
        return torch.autograd.grad(loss, [y] + mats + bias + facs)
    for force in (False, True):
        set_kernel_options(eager_via_ops=force)
        set_kernel_options(save_y_hat=True)
        a = grads()
        set_kernel_options(save_y_hat=False)
        b = grads()
        assert all(torch.equal(x, z) for x, z in zip(a, b))


@pytest.mark.parametrize("be", KERNELS)
def test_module_equals_reference_module(be, device):
    _skip_unless(be, device)
    torch.manual_seed(0)
    m_ref = EntropyBottleneck(8, backend="reference").to(device)
    with torch.no_grad():
        for p in m_ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m_ker = EntropyBottleneck(8, backend=be).to(device)
    m_ker.load_state_dict(m_ref.state_dict())
    y = 2 * torch.randn(4, 8, 3, 3, device=device)
    for train in (True, False):
        m_ref.train(train), m_ker.train(train)
        a = m_ref(y, seed=4, offset=2)
        b = m_ker(y, seed=4, offset=2)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-6)
        ga = torch.autograd.grad(m_ref.rate(a[1]).sum(), list(m_ref.parameters()), allow_unused=True)
        gb = torch.autograd.grad(m_ker.rate(b[1]).sum(), list(m_ker.parameters()), allow_unused=True)
        for x, z in zip(ga, gb):
            assert (x is None) == (z is None)
            if x is not None:
                torch.testing.assert_close(z, x, rtol=2e-4, atol=2e-4)
    ibm_ref = IBM(8, rho=0.25, s=0.5, backend="reference").to(device)
    ibm_ker = IBM(8, rho=0.25, s=0.5, backend=be).to(device)
    ibm_ker.load_state_dict(ibm_ref.state_dict())
    w = torch.randn(6, 8, device=device)
    a, b = ibm_ref(w, seed=3), ibm_ker(w, seed=3)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(b[1], a[1].float(), rtol=1e-5, atol=1e-4)


def test_auto_falls_back_for_float64_and_other_filters():
    mats, bias, facs, _ = _params(3, "cpu")
    y = torch.randn(4, 3, dtype=torch.float64)
    m64 = [m.detach().double() for m in mats]
    b64 = [b.detach().double() for b in bias]
    f64 = [f.detach().double() for f in facs]
    out = entropy_bottleneck(y, m64, b64, f64, seed=1)  # auto: C++ float64 kernel (or the reference)
    assert out.rate.dtype == torch.float64
    with pytest.raises(BackendUnavailableError, match="float32/float16/bfloat16"):
        entropy_bottleneck(y, m64, b64, f64, seed=1, backend="triton")
    p = ref.init_params(3, filters=(3, 3))
    out = entropy_bottleneck(torch.randn(4, 3), p["matrices"], p["biases"], p["factors"], seed=1)
    assert out.rate.shape == (4,)


def test_bad_arguments():
    mats, bias, facs, _ = _params(3, "cpu")
    with pytest.raises(ValueError, match="mode"):
        entropy_bottleneck(torch.randn(2, 3), mats, bias, facs, mode="round")
    with pytest.raises(ValueError, match="rho"):
        entropy_bottleneck(torch.randn(2, 3), mats, bias, facs, rho=1.5)
    with pytest.raises(TypeError, match="y"):
        entropy_bottleneck([1.0, 2.0], mats, bias, facs)
    with pytest.raises(ValueError, match="medians"):
        entropy_bottleneck(torch.randn(2, 3), mats, bias, facs, mode="dequantize", backend="triton")
    with pytest.raises(ValueError, match="channels"):
        entropy_bottleneck(torch.randn(2, 4), mats, bias, facs, backend="triton")
    with pytest.raises(ValueError, match="seed"):
        entropy_bottleneck(torch.randn(2, 3), mats, bias, facs, seed=-1, backend="triton")


@pytest.mark.parametrize("be", ["reference"] + KERNELS)
def test_bound_must_be_finite_on_every_backend(be, device):
    """A NaN or infinite likelihood bound is the reference's ValueError naming ``bound`` on
    every backend (the C++ kernels' own NaN check is not what a user sees); a bound <= 0
    disables it, as CompressAI's."""
    if be != "reference":
        _skip_unless(be, device)
    mats, bias, facs, _ = _params(3, device)
    y = torch.randn(4, 3, device=device)
    for bound in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"^bound must be finite, got"):
            entropy_bottleneck(y, mats, bias, facs, seed=1, bound=bound, backend=be)
    off = entropy_bottleneck(y, mats, bias, facs, seed=1, bound=-1.0, backend=be)
    want = entropy_bottleneck(y, mats, bias, facs, seed=1, bound=0.0, backend=be)
    assert torch.equal(off.rate, want.rate)


@pytest.mark.parametrize("be", KERNELS)
def test_argument_errors_are_the_references(be, device):
    """A kernel backend raises the reference's error, type and message, for each bad
    argument (the ops run the reference's checks before choosing a backend)."""
    _skip_unless(be, device)
    mats, bias, facs, med = _params(4, device)
    y = torch.randn(3, 4, device=device)
    bad = [dict(y=y.long()), dict(y=y[0]), dict(y=y[:, :3]), dict(mode="round"), dict(rho=1.5),
           dict(rho=float("nan")), dict(s=0.0), dict(seed=-1), dict(seed=1.5), dict(offset=-3),
           dict(offset=2**63 - 2), dict(mode="dequantize"), dict(mode="dequantize", medians=med[:3]),
           dict(mode="dequantize", medians=med.long()), dict(bound=float("nan")),
           dict(matrices=mats[:3]), dict(matrices=[t[:3] for t in mats]), dict(groups=0),
           dict(groups=2), dict(groups=True)]
    for case in bad:
        kw = dict(y=y, matrices=mats, biases=bias, factors=facs) | case
        errors = []
        for backend in ("reference", be):
            with pytest.raises((ValueError, TypeError)) as e:
                entropy_bottleneck(**kw, backend=backend)
            errors.append((e.type, str(e.value)))
        assert errors[0] == errors[1], case


def test_opcheck(device):
    """cifd::entropy_bottleneck, the Triton kernels' op for a seed tensor (the C++ backends'
    fused op has its own opcheck: test_cpp_entropy_bottleneck)."""
    _skip_unless("triton", device)
    from cifd_kernels.ops.density_pack import pack_density
    mats, bias, facs, med = _params(3, device)
    packed = pack_density(mats, bias, facs).detach().requires_grad_()
    y = torch.randn(5, 3, device=device, requires_grad=True)
    for mode, m in (("noise", None), ("dequantize", med.detach().float())):
        torch.library.opcheck(torch.ops.cifd.entropy_bottleneck.default,
                              (y, packed, m, mode, 7, 3, 0.25, 0.5, 1e-9, True, 0, None))
        # the seed as a tensor (what a module draws under torch.compile)
        torch.library.opcheck(torch.ops.cifd.entropy_bottleneck.default,
                              (y, packed, m, mode, 0, 3, 0.25, 0.5, 1e-9, True, 0, torch.tensor(7)))
    # groups: y [G, N, C/G] against the packed density of C channels
    yg = torch.randn(3, 4, 1, device=device, requires_grad=True)
    for mode, m in (("noise", None), ("dequantize", med.detach().float())):
        torch.library.opcheck(torch.ops.cifd.entropy_bottleneck.default,
                              (yg, packed, m, mode, 7, 3, 0.25, 0.5, 1e-9, True, 3, None))


GROUP_CASES = [("noise", 0.0, 1.0), ("noise", 0.25, 0.5), ("dequantize", 0.0, 1.0), ("none", 0.0, 1.0)]


@pytest.mark.parametrize("be", ["reference"] + KERNELS)
@pytest.mark.parametrize("mode,rho,s", GROUP_CASES)
@pytest.mark.parametrize("via_ops", [False, True])
@pytest.mark.parametrize("spatial", [(), (2,)])
def test_groups_are_the_per_group_calls(be, mode, rho, s, via_ops, spatial, device):
    """``groups=G`` on y [G, N, C/G, *spatial] gives, to the bit, the G calls on y[g] with
    channels g C/G .. (g+1) C/G - 1 of the density and offset ``offset + g y[g].numel()``:
    y_hat, rate, likelihoods and every gradient (the gradients of the density and medians
    being the sums of the per-group ones, each over its own channels: disjoint). On the
    eager path and through the registered ops (the eager_via_ops kernel option)."""
    if be != "reference":
        _skip_unless(be, device)
    set_kernel_options(eager_via_ops=via_ops)
    G, N, cg = 3, 5, 2
    mats, bias, facs, med = _params(G * cg, device, seed=4)
    gen = torch.Generator().manual_seed(6)
    y = (4 * torch.randn(G, N, cg, *spatial, generator=gen)).to(device).requires_grad_()
    medians = med if mode == "dequantize" else None
    if be == "triton" and spatial:  # the Triton launchers take groups of [N, C] only
        with pytest.raises(BackendUnavailableError, match="no spatial dims"):
            entropy_bottleneck(y, mats, bias, facs, medians, mode=mode, backend=be, groups=G)
        return
    g_yhat, g_lik = (torch.randn(y.shape, generator=gen).to(device) for _ in range(2))
    g_rate = torch.randn(G, N, generator=gen).to(device)
    wrt = [y] + mats + bias + facs + ([med] if medians is not None else [])

    def loss_of(out, g):
        return ((out.y_hat.float() * g_yhat[g]).sum() + (out.rate * g_rate[g]).sum()
                + (out.likelihood * g_lik[g]).sum())

    got = entropy_bottleneck(y, mats, bias, facs, medians, mode=mode, seed=9, offset=13, rho=rho, s=s,
                             need_likelihood=True, deterministic=True, backend=be, groups=G)
    assert got.rate.shape == (G, N) and got.y_hat.shape == got.likelihood.shape == y.shape
    ggot = torch.autograd.grad(sum(loss_of(type(got)(*(t[g] for t in got)), g) for g in range(G)), wrt)
    per = y[0].numel()
    loss, outs = 0, []
    for g in range(G):
        ch = slice(g * cg, (g + 1) * cg)
        out = entropy_bottleneck(y[g], [m[ch] for m in mats], [b[ch] for b in bias], [f[ch] for f in facs],
                                 medians[ch] if medians is not None else None, mode=mode, seed=9,
                                 offset=13 + g * per, rho=rho, s=s, need_likelihood=True,
                                 deterministic=True, backend=be)
        outs.append(out)
        loss = loss + loss_of(out, g)
    gwant = torch.autograd.grad(loss, wrt)
    for name, a, b in zip(got._fields, got, (torch.stack(t) for t in zip(*outs))):
        assert torch.equal(a, b), name
    for i, (a, b) in enumerate(zip(ggot, gwant)):
        # one group's rows of the density / medians gradient take no term from the others
        assert torch.equal(a, b), i


def test_groups_bad_arguments():
    mats, bias, facs, med = _params(6, "cpu")
    y = torch.randn(3, 4, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="groups must be a positive int"):
            entropy_bottleneck(y, mats, bias, facs, groups=bad)
    with pytest.raises(ValueError, match=r"y must be \[groups, N, C / groups, \*spatial\] = \[2, N, 3"):
        entropy_bottleneck(y, mats, bias, facs, groups=2)
    with pytest.raises(ValueError, match=r"y must be \[groups, N, C / groups"):
        entropy_bottleneck(torch.randn(3, 4), mats, bias, facs, groups=3)
    for be in ("reference", "cpu"):
        if be == "cpu" and "cpu" not in __import__("cifd_kernels").backend.implemented("entropy_bottleneck"):
            continue
        with pytest.raises(ValueError, match=r"medians must be \[6\], got shape \(2,\)"):
            entropy_bottleneck(y, mats, bias, facs, med[:2], mode="dequantize", groups=3, backend=be)


def test_compile_fullgraph_equals_eager():
    """The op and modules trace into one graph (custom ops are opaque to Dynamo)."""
    be = "cpu" if "cpu" in __import__("cifd_kernels").backend.implemented("entropy_bottleneck") else "triton"
    backend_or_skip(be, "cpu")
    torch.manual_seed(0)
    m = EntropyBottleneck(6, backend=be)
    ibm = IBM(6, rho=0.25, backend=be)
    y = torch.randn(5, 6, requires_grad=True)

    def f(y, seed: int):
        y_hat, lik = m(y, seed=seed)
        w_hat, rate = ibm(y_hat, seed=seed + 1)
        return w_hat, m.rate(lik) + rate

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed in (3, 4):
        a, b = f(y, seed), cf(y, seed)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(b[1], a[1])
        ga = torch.autograd.grad(a[1].sum(), [y] + list(m.parameters()), allow_unused=True)
        gb = torch.autograd.grad(b[1].sum(), [y] + list(m.parameters()), allow_unused=True)
        for x, z in zip(ga, gb):
            if x is not None:
                torch.testing.assert_close(z, x)


@pytest.mark.gpu
def test_compile_fullgraph_triton_op_on_gpu():
    """On a GPU the Triton path is a torch.library.triton_op: Inductor compiles the
    module into one graph that launches our kernels; outputs and gradients equal eager."""
    backend_or_skip("triton", "cuda")
    torch.manual_seed(0)
    m = EntropyBottleneck(6, backend="triton").cuda()
    ibm = IBM(6, rho=0.25, backend="triton").cuda()
    y = torch.randn(33, 6, device="cuda", requires_grad=True)

    def f(y, seed: int):
        y_hat, lik = m(y, seed=seed)
        w_hat, rate = ibm(y_hat, seed=seed + 1)
        return w_hat, m.rate(lik) + rate

    cf = torch.compile(f, fullgraph=True)
    for seed in (3, 4):
        a, b = f(y, seed), cf(y, seed)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(b[1], a[1])
        g = torch.randn(a[1].shape, device="cuda")
        ga = torch.autograd.grad(a[1], [y] + list(m.parameters()), g, allow_unused=True)
        gb = torch.autograd.grad(b[1], [y] + list(m.parameters()), g, allow_unused=True)
        for x, z in zip(ga, gb):
            assert (x is None) == (z is None)
            if x is not None:
                torch.testing.assert_close(z, x)


@pytest.mark.gpu
def test_triton_and_cuda_agree_on_a_large_input():
    """2^20 elements (many programs and blocks): Triton's y_hat is CUDA's, bit for bit."""
    backend_or_skip("triton", "cuda")
    backend_or_skip("cuda", "cuda")
    mats, bias, facs, _ = _params(64, "cuda")
    y = torch.randn((1 << 20) // 64, 64, device="cuda")
    a = entropy_bottleneck(y, mats, bias, facs, seed=5, backend="triton")
    c = entropy_bottleneck(y, mats, bias, facs, seed=5, backend="cuda")
    assert torch.equal(a.y_hat, c.y_hat)
    torch.testing.assert_close(a.rate, c.rate, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("be", ["reference", "cpu", "triton", "cuda"])
def test_ibm_op_is_the_module_and_the_reference(be, device):
    """``cifd_kernels.ops.ibm``: the IBM module's bits, the reference's y_hat bit for bit
    and its rate within the kernels' float32 bound (as ``test_cpp_entropy_bottleneck``);
    not training, ``(w, 0)`` without a kernel."""
    from cifd_kernels.ops import ibm as ibm_op
    from cifd_kernels.reference.ibm import ibm as ref_ibm
    if be != "reference":
        _skip_unless(be, device)
    torch.manual_seed(0)
    m = IBM(6, rho=0.25, s=0.5, backend=be).to(device)
    w = 2 * torch.randn(9, 6, device=device)
    got = ibm_op(w, *m._params(), rho=0.25, s=0.5, seed=3, offset=5, backend=be)
    mod = m(w, seed=3, offset=5)
    want = ref_ibm(w, *m._params(), rho=0.25, s=0.5, seed=3, offset=5)
    assert torch.equal(got[0], mod[0]) and torch.equal(got[1], mod[1])
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1].detach(), rtol=2e-4, atol=2e-5 * (1 + float(want[1].abs().max())))
    with pytest.raises(ValueError, match=r"^w has 5 channels \(dim 1\) but the parameters have 6$"):
        ibm_op(w[:, :5], *m._params(), rho=0.25, s=0.5, seed=3, backend=be)  # named w, as the reference
    w_hat, rate = ibm_op(w, *m._params(), rho=0.25, s=0.5, training=False, backend=be)
    assert torch.equal(w_hat, w) and torch.equal(rate, torch.zeros(9, device=device))
    with pytest.raises(ValueError, match=r"s \(noise scale\) must be finite and > 0"):
        ibm_op(w, *m._params(), s=0.0, backend=be)


@pytest.mark.parametrize("use", [("y_hat", "rate"), ("rate",), ("y_hat", "rate", "likelihood")])
def test_triton_routes_launch_the_same_backward(use, device, monkeypatch):
    """The eager Function and the registered ops hand the Triton backward launcher the
    same arguments (present or absent, shape, dtype) whichever outputs get a gradient:
    the registered ops' autograd gives an unused output a zero gradient, the eager
    Function None. On a GPU a different kernel specialization gave different bits (the
    H200, 2026-12-04: unused likelihoods); under the interpreter the bits cannot show it."""
    _skip_unless("triton", device)
    eb_ops = importlib.import_module("cifd_kernels.ops.entropy_bottleneck")
    launcher = eb_ops._triton()
    real, seen = launcher.entropy_bottleneck_bwd, []

    def spy(*args, **kw):
        seen.append([None if a is None else (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor)
                     else a for a in args] + sorted(kw.items()))
        return real(*args, **kw)
    monkeypatch.setattr(launcher, "entropy_bottleneck_bwd", spy)
    mats, bias, facs, med = _params(4, device)
    y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    for via_ops in (False, True):
        set_kernel_options(eager_via_ops=via_ops)
        out = entropy_bottleneck(y, mats, bias, facs, med, mode="dequantize", seed=2, need_likelihood=True,
                                 backend="triton")
        sum(getattr(out, name).float().sum() for name in use).backward()
    assert len(seen) == 2 and seen[0] == seen[1], seen
