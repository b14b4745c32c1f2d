# SPDX-License-Identifier: Apache-2.0
"""Density packing (cifd_C::density_pack / density_unpack_grad, the packed rows every
fused entropy kernel reads, and :func:`pack_density`, one autograd node over them)
and the eager fast path of the cifd:: ops: the C++ pair and its torch-formula
stand-in against autograd-tracked torch ops, gradients in the parameters' dtypes
and strides, opcheck, and eager calls (one autograd.Function) bit-identical to the
same calls through the registered custom ops."""
import pytest
import torch

from cifd_kernels.backend import set_kernel_options
from cifd_kernels.ops import _eager
from cifd_kernels.ops import density_pack as P
from cifd_kernels.reference import entropy_bottleneck as ref
from helpers import backend_or_skip


def _params(C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = ref.init_params(C, generator=g)
    # spread: softplus above its threshold of 20 and far below 0, tanh saturated
    def jit(t, scale):
        return (t + scale * torch.randn(t.shape, generator=g)).to(dtype).requires_grad_()
    mats = [jit(m, 12.0) for m in p["matrices"]]
    bias = [jit(b, 1.0) for b in p["biases"]]
    facs = [jit(f, 4.0) for f in p["factors"]]
    return mats, bias, facs


def _torch_pack(mats, bias, facs):
    """The row table written out with autograd-tracked float32 torch ops (the docstring's
    layout). float32 on both sides: d tanh = 1 - tanh^2 cancels for saturated factors,
    in torch's own backward as in the kernel."""
    C = mats[0].shape[0]
    cols = []
    for k in range(5):
        cols.append(torch.nn.functional.softplus(mats[k]).reshape(C, -1))
        cols.append(bias[k].reshape(C, -1))
        if k < 4:
            cols.append(torch.tanh(facs[k]).reshape(C, -1))
    return torch.cat(cols, 1).t()


@pytest.mark.parametrize("C", [1, 3, 193])
@pytest.mark.parametrize("cpp", [True, False])
def test_pack_and_gradients_match_torch(C, cpp):
    """The C++ pair (cpp) and the torch formulas that stand in for it where ``_C`` lacks
    the device, as pack_density's one autograd node."""
    if cpp:
        backend_or_skip("cpu", "cpu")
        assert P._use_cpp(torch.zeros(1))  # what pack_density takes on the CPU
    mats, bias, facs = _params(C)
    packed = P._Pack.apply(False, cpp, *P._flat(mats, bias, facs))
    want = _torch_pack(mats, bias, facs)
    assert packed.shape == (58, C) and packed.dtype == torch.float32 and packed.is_contiguous()
    torch.testing.assert_close(packed, want, rtol=1e-6, atol=1e-6)
    g = torch.randn(58, C, generator=torch.Generator().manual_seed(5))
    wrt = P._flat(mats, bias, facs)
    got = torch.autograd.grad((packed * g).sum(), wrt)
    exp = torch.autograd.grad((want * g).sum(), wrt)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the by-hand chain gives the same gradients (59 rows: the medians' row is ignored)
    gp = torch.cat([g, torch.ones(1, C)])
    by_hand = P._unpack(gp, [t.detach() for t in wrt], cpp)
    assert all(torch.equal(a, b) for a, b in zip(by_hand, got))


def test_float64_pack_is_float64_and_gradchecks():
    mats, bias, facs = _params(3, torch.float64)
    assert P.pack_density(mats, bias, facs, dtype=torch.float64).dtype == torch.float64
    wrt = mats + bias + facs

    def f(*ps):
        return P.pack_density(ps[0:5], ps[5:10], ps[10:14], dtype=torch.float64)
    assert torch.autograd.gradcheck(f, wrt)


def test_gradients_keep_parameter_dtype_and_strides():
    mats, bias, facs = _params(4, torch.bfloat16)
    # a non-contiguous [C, 3, 3] matrix (a transposed view's strides) and a [C, 1, 1] bias
    base = torch.randn(4, 3, 3).transpose(1, 2).to(torch.bfloat16).requires_grad_()
    mats[1] = base
    packed = P.pack_density(mats, bias, facs)
    assert packed.dtype == torch.float32
    grads = torch.autograd.grad(packed.sum(), mats + bias + facs)
    for p, gp in zip(mats + bias + facs, grads):
        assert gp.dtype == p.dtype and gp.shape == p.shape and gp.stride() == p.stride()


def test_pack_rejects_other_filters_and_dtypes():
    mats, bias, facs = _params(2)
    with pytest.raises(ValueError, match="filters"):
        P.pack_density(mats[:4], bias[:4], facs[:3])
    with pytest.raises(ValueError, match="dtype"):
        P.pack_density(mats, bias, facs, dtype=torch.float16)


def test_cpp_binding_checks_name_arguments():
    backend_or_skip("cpu", "cpu")
    mats, bias, facs = _params(3)
    flat = [t.detach() for t in P._flat(mats, bias, facs)]
    with pytest.raises(RuntimeError, match="params must hold"):
        torch.ops.cifd_C.density_pack(flat[:13], False)
    bad = list(flat)
    bad[4] = torch.zeros(5, 3, 1)
    with pytest.raises(RuntimeError, match=r"params\[4\] must be \[3"):
        torch.ops.cifd_C.density_pack(bad, False)
    with pytest.raises(RuntimeError, match="grad_packed must be"):
        torch.ops.cifd_C.density_unpack_grad(torch.zeros(57, 3), flat)


@pytest.mark.parametrize("float64", [False, True])
def test_opcheck(float64):
    """The pair's fake kernels and schemas (no autograd of their own: pack_density and
    the fused entropy op differentiate them)."""
    backend_or_skip("cpu", "cpu")
    P.cpp_devices()  # registers the fakes
    mats, bias, facs = _params(5)
    flat = [t.detach() for t in P._flat(mats, bias, facs)]
    torch.library.opcheck(torch.ops.cifd_C.density_pack.default, (flat, float64))
    g = torch.randn(59, 5, dtype=torch.float64 if float64 else torch.float32)
    torch.library.opcheck(torch.ops.cifd_C.density_unpack_grad.default, (g, flat))


# ----------------------------------------------------------------------------- eager fast path
def _eb_run(be):
    from cifd_kernels.ops import entropy_bottleneck
    mats, bias, facs = _params(7, seed=1)
    g = torch.Generator().manual_seed(2)
    y = (3 * torch.randn(6, 7, generator=g)).requires_grad_()
    out = entropy_bottleneck(y, mats, bias, facs, mode="noise", seed=9, offset=4, rho=0.25, s=0.5,
                             need_likelihood=True, backend=be)
    loss = ((out.y_hat * torch.randn(6, 7, generator=g)).sum() + (out.rate * torch.randn(6, generator=g)).sum()
            + (out.likelihood * torch.randn(6, 7, generator=g)).sum())
    return (out.y_hat, out.rate, out.likelihood) + torch.autograd.grad(loss, [y] + mats + bias + facs)


def _loss_run(be):
    from cifd_kernels.ops.cifd_loss import cifd_loss
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 7, generator=g, requires_grad=True)
    u = torch.randn(5, 4, generator=g, requires_grad=True)
    loss, terms = cifd_loss(z, torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (5,), generator=g),
                            u, torch.randn(3, 5, 4, generator=g), lam=[1.0, 0.5, 0.25], tau=2.0,
                            p_drop=0.3, w_emb=0.1, seed=4, backend=be)
    return (loss, terms["ce"], terms["kl"], terms["emb"]) + torch.autograd.grad(loss * 1.7, [z, u])


def _linear_run(be):
    from cifd_kernels.ops.rdm_bank import rdm_linear
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 6, generator=g, requires_grad=True)
    b = torch.randn(3, 4, generator=g, requires_grad=True)
    y = rdm_linear(x, w, b, "gelu", backend=be)
    return (y,) + torch.autograd.grad((y * torch.randn(3, 5, 4, generator=g)).sum(), [x, w, b])


@pytest.mark.parametrize("run,op", [(_eb_run, "entropy_bottleneck"), (_loss_run, "cifd_loss"),
                                    (_linear_run, "rdm_linear")])
@pytest.mark.parametrize("be", ["cpu", "triton"])
def test_eager_path_is_bit_identical_to_custom_ops(run, op, be, monkeypatch):
    """Outputs and gradients of eager calls (one autograd.Function) equal, bit for
    bit, the same calls through the registered custom ops (the eager_via_ops kernel option)."""
    backend_or_skip(be, "cpu")
    from cifd_kernels import backend
    if be not in backend.implemented(op):
        pytest.skip(f"no {be} kernel for {op}")
    set_kernel_options(eager_via_ops=False)
    fast = run(be)
    set_kernel_options(eager_via_ops=True)
    slow = run(be)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_eager_path_taken_only_outside_tracing():
    t = torch.zeros(2)
    assert not _eager.via_ops(t)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert _eager.via_ops(mode.from_tensor(t))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_pack_matches_cpu():
    """pack_density on CUDA tensors (the C++ pair's ATen versions, or the torch formulas
    for a _C without CUDA) against the CPU kernel, gradients included."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    mats, bias, facs = _params(64, seed=3)
    gm = [t.detach().cuda().requires_grad_() for t in mats]
    gb = [t.detach().cuda().requires_grad_() for t in bias]
    gf = [t.detach().cuda().requires_grad_() for t in facs]
    packed = P.pack_density(gm, gb, gf)
    want = P.pack_density(mats, bias, facs)
    torch.testing.assert_close(packed.cpu(), want.detach(), rtol=2e-6, atol=2e-6)
    g = torch.randn(58, 64)
    got = torch.autograd.grad((packed * g.cuda()).sum(), gm + gb + gf)
    exp = torch.autograd.grad((want * g).sum(), mats + bias + facs)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("float64", [False, True])
def test_generic_pack_ops_match_the_cpu_kernels(float64, device):
    """cifd_C::density_pack_generic / density_unpack_grad_generic: the ATen versions the
    CUDA build registers for density_pack / density_unpack_grad on CUDA tensors (the
    fused C++ entropy op packs through them on a GPU), against the C++ CPU kernels."""
    import cifd_kernels._C  # noqa: F401
    if not hasattr(torch.ops.cifd_C, "density_pack_generic"):
        pytest.skip("_C built without the generic pack ops")
    if device == "cuda":
        backend_or_skip("cuda", "cuda")
    mats, bias, facs = _params(37)
    params = [t.detach() for t in P._flat(mats, bias, facs)]
    want = torch.ops.cifd_C.density_pack(params, float64)
    dev = [p.to(device) for p in params]
    got = torch.ops.cifd_C.density_pack_generic(dev, float64)
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got.cpu(), want, rtol=2e-6, atol=1e-7)
    if device == "cuda":  # what the fused op dispatches to there
        torch.testing.assert_close(torch.ops.cifd_C.density_pack(dev, float64).cpu(), want,
                                   rtol=2e-6, atol=1e-7)
    g = torch.randn(59, 37, generator=torch.Generator().manual_seed(2), dtype=want.dtype)
    want_g = torch.ops.cifd_C.density_unpack_grad(g, params)
    got_g = torch.ops.cifd_C.density_unpack_grad_generic(g.to(device), dev)
    for a, b, p in zip(got_g, want_g, params):
        assert a.shape == p.shape and a.dtype == p.dtype
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="params must hold the 14"):
        torch.ops.cifd_C.density_pack_generic(dev[:5], float64)
