# SPDX-License-Identifier: Apache-2.0
"""The fused RDM bank (cifd_kernels.ops.rdm_bank, the RDMBank module on the kernel
backends) against the eager reference: outputs, losses, terms and the gradients to
every parameter and input; N in {1, 3, 5}; odd widths; B in {1, 3, 1025}; relu/gelu;
mse/smooth_l1; the three channel modes; labels or teacher left out; half parameters
by the flash-attention rule; the batched linear op (cifd::rdm_linear) with opcheck;
torch.compile equal to eager on CPU; a bank from N RDMs equals them one by one on
the fused path; determinism; fallbacks and errors."""
import importlib

import pytest
import torch

from cifd_kernels.backend import set_kernel_options
from cifd_kernels import BackendUnavailableError
from cifd_kernels import backend as _backend
from cifd_kernels.nn.rdm import RDM, RDMBank
from cifd_kernels.ops import rdm_bank as ob
from cifd_kernels.reference import entropy_bottleneck as eb_ref
from cifd_kernels.reference import rdm as ref
from helpers import backend_or_skip

KERNELS = ["cpu", "triton", "cuda"]


def _skip_unless(be, device):
    if (be == "cuda") != (device == "cuda") and be != "triton":
        pytest.skip(f"{be} kernels do not take {device} tensors")
    if (be == "cpu") != (device == "cpu") and be != "triton":
        pytest.skip(f"{be} kernels do not take {device} tensors")
    backend_or_skip(be, device)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _problem(n, b, d, h, l, k, device, seed=0, dtype=torch.float32):
    """Bank parameters (leaf tensors), a perturbed entropy model over n*l channels,
    x, teacher logits and labels."""
    p = ref.init_params(n, d, h, l, k, generator=_g(seed))
    e = eb_ref.init_params(n * l, (3, 3, 3, 3), generator=_g(seed + 1))
    g = _g(seed + 2)
    lists = [[(t + 0.3 * torch.randn(t.shape, generator=g)) for t in e[key]]
             for key in ("matrices", "biases", "factors")]
    med = 0.3 * torch.randn(n * l, generator=g)
    x = 2.0 * torch.randn(b, d, generator=g)
    t = 3.0 * torch.randn(b, k, generator=g)
    y = torch.randint(0, k, (b,), generator=g)
    leaf = lambda v: v.to(device, dtype).requires_grad_()  # noqa: E731
    return ({key: leaf(v) for key, v in p.items()}, [[leaf(v) for v in ts] for ts in lists],
            med.to(device), x.to(device, dtype), t.to(device, dtype), y.to(device))


def _run(be, prob, *, act="relu", mode="noise", dist="mse", R=(1.0, 0.5, 2.0, 0.1, 3.0), labels=True,
         teacher=True, seed=3, offset=5, x=None):
    p, (mats, biases, facs), med, x0, t, y = prob
    x = x0 if x is None else x
    n = p["enc1.weight"].shape[0]
    leaves = list(p.values()) + mats + biases + facs
    for v in leaves:
        v.grad = None
    kw = dict(act=act, mode=mode, seed=seed, offset=offset)
    if be == "reference":
        out = ref.rdm_bank_forward(x, p, mats, biases, facs, med, **kw)
        loss, terms = ref.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, list(R[:n]),
                                        y if labels else None, t if teacher else None, dist=dist, tau=2.0,
                                        lam_kl=0.7)
    else:
        out = ob.rdm_bank_forward(x, p, mats, biases, facs, med, backend=be, **kw)
        loss, terms = ob.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, list(R[:n]),
                                       y if labels else None, t if teacher else None, dist=dist, tau=2.0,
                                       lam_kl=0.7, backend=be)
    if mode != "dequantize" or loss.requires_grad:
        # Random weights on every output (never a bare .sum()).
        outs = [out.x_hat, out.logits, out.rate, loss]
        outs = [o for o in outs if o.requires_grad]
        gs = [torch.randn(o.shape, generator=_g(50 + i)).to(o.device, o.dtype) for i, o in enumerate(outs)]
        torch.autograd.backward(outs, gs)
    grads = [v.grad.clone() if v.grad is not None else None for v in leaves]
    return out, loss, terms, grads


def _compare(be, prob, rtol=1e-4, atol=1e-5, **kw):
    want = _run("reference", prob, **kw)
    got = _run(be, prob, **kw)
    for name, a, b in zip(ref.RDMBankOutput._fields, got[0], want[0]):
        if name == "z_hat":  # the channel output: noise bits identical, so exact up to z's rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], rtol=rtol, atol=atol, msg=key)
    for i, (a, b) in enumerate(zip(got[3], want[3])):
        assert (a is None) == (b is None), i
        if a is not None:
            # Parameter gradients are sums over the batch (1025 rows): fp32 summation order
            # differs between the kernels and the reference, so the absolute slack scales
            # with the gradient's magnitude.
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=rtol, atol=max(atol, 1e-5 * scale), msg=f"grad {i}")
    return got


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("act,dist", [("relu", "mse"), ("gelu", "smooth_l1")])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_matches_reference(be, act, dist, n, device):
    _skip_unless(be, device)
    _compare(be, _problem(n, 3, 10, 12, 4, 7, device, seed=n), act=act, dist=dist)


@pytest.mark.parametrize("be", KERNELS)
def test_paper_odd_widths(be, device):
    """D = 100, H = 306, L = 17, K = 1000 (odd sizes everywhere), B = 3."""
    _skip_unless(be, device)
    _compare(be, _problem(3, 3, 100, 306, 17, 1000, device, seed=7), act="gelu", rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("b", [1, 1025])
def test_batch_sizes(be, b, device):
    _skip_unless(be, device)
    if be == "triton" and device == "cpu" and b > 65:
        b = 65  # the interpreter is slow; 65 still spans two GEMM row tiles (1025 runs on GPUs)
    _compare(be, _problem(2, b, 9, 10, 3, 7, device, seed=b), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("mode", ["dequantize", "none"])
def test_channel_modes(be, mode, device):
    _skip_unless(be, device)
    _compare(be, _problem(3, 4, 8, 9, 5, 7, device, seed=11), mode=mode, act="gelu")


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("labels,teacher", [(False, True), (True, False), (False, False)])
def test_terms_left_out(be, labels, teacher, device):
    _skip_unless(be, device)
    got = _compare(be, _problem(3, 4, 8, 9, 5, 7, device, seed=12), labels=labels, teacher=teacher)
    if not labels:
        assert torch.all(got[2]["ce"] == 0)
    if not teacher:
        assert torch.all(got[2]["kl"] == 0)


@pytest.mark.parametrize("be", KERNELS)
def test_noncontiguous_x_and_gradient_to_nothing_frozen(be, device):
    """A strided x gives the same results; the bank's parameters all get gradients."""
    _skip_unless(be, device)
    prob = _problem(3, 5, 8, 9, 4, 7, device, seed=13)
    x = prob[3]
    strided = torch.stack([x, -x], -1)[..., 0]
    assert not strided.is_contiguous()
    got = _compare(be, prob, x=strided)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in got[3])


def _assert_eager_equals_ops(be, prob, mode, calls, want_eager, want_ops):
    """Run the bank on the eager path and through the registered ops (the eager_via_ops
    kernel option: the route torch.compile traces), checking the entropy-op calls each run
    made (``calls``, recorded by :func:`_count_channel_calls`): ``want_eager`` and
    ``want_ops``. Every output, the loss and every gradient must have the same bits."""
    runs = []
    for force, want in ((False, want_eager), (True, want_ops)):
        calls.clear()
        set_kernel_options(eager_via_ops=force)
        runs.append(_run(be, prob, mode=mode))
        assert calls == want, (force, calls)
    (out_a, loss_a, _, grads_a), (out_b, loss_b, _, grads_b) = runs
    for name, u, v in zip(ref.RDMBankOutput._fields, out_a, out_b):
        assert (u is None) == (v is None), name
        if u is not None:
            assert torch.equal(u, v), name
    assert torch.equal(loss_a, loss_b)
    for i, (u, v) in enumerate(zip(grads_a, grads_b)):
        assert (u is None) == (v is None), i
        if u is not None:
            assert torch.equal(u, v), i


def _count_channel_calls(monkeypatch, calls):
    """Record each entropy-op call the bank makes outside the registered Python ops:
    ``("fused", groups)`` for the C++-autograd op, ``("function", groups)`` for the
    eager autograd.Function of the Triton kernels."""
    eb_ops = importlib.import_module("cifd_kernels.ops.entropy_bottleneck")
    real = eb_ops._fused_op()
    apply = eb_ops._EagerFunction.apply
    # apply's arguments end with (..., need_likelihood, groups)
    monkeypatch.setattr(eb_ops._EagerFunction, "apply",
                        lambda *a: calls.append(("function", a[-1])) or apply(*a))
    if real is not None:  # its arguments end with (..., groups, seed_tensor)
        monkeypatch.setattr(eb_ops, "_fused_op",
                            lambda: (lambda *a: calls.append(("fused", a[-2])) or real(*a)))
    return real


@pytest.mark.parametrize("be", ["cpu", "cuda"])
@pytest.mark.parametrize("mode", ["noise", "dequantize", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_channel_is_one_grouped_entropy_call(be, mode, dtype, device, monkeypatch):
    """The bank's channel is one call of the entropy op with groups = N: on the C++
    backends the op with C++ autograd (cifd_C::entropy_bottleneck_fused), eagerly and on
    the traced route alike, with the same bits. That the grouped op is the per-RDM calls
    is test_entropy_bottleneck's test_groups_are_the_per_group_calls."""
    _skip_unless(be, device)
    calls = []
    _count_channel_calls(monkeypatch, calls)
    prob = _problem(3, 7, 10, 12, 5, 6, device, seed=21, dtype=dtype)
    _assert_eager_equals_ops(be, prob, mode, calls, [("fused", 3)], [("fused", 3)])


@pytest.mark.parametrize("mode", ["noise", "dequantize", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_bank_channel_is_one_grouped_entropy_call(mode, dtype, device, monkeypatch):
    """Eager Triton calls run the bank's channel as one entropy-op call with groups = N
    (one launch of each entropy kernel); the registered triton_op gives the same bits."""
    _skip_unless("triton", device)
    prob = _problem(3, 7, 10, 12, 5, 6, device, seed=22, dtype=dtype)
    calls = []
    _count_channel_calls(monkeypatch, calls)
    _assert_eager_equals_ops("triton", prob, mode, calls, [("function", 3)], [])


def test_triton_grouped_entropy_launcher(device):
    """The Triton launchers' groups argument: G problems in one launch give the bits of G
    calls on the blocks (every mode), and bad shapes name the argument."""
    backend_or_skip("triton", device)
    from cifd_kernels._triton import entropy_bottleneck as tk
    from cifd_kernels.ops.density_pack import pack_density
    G, N, C = 3, 37, 20
    e = eb_ref.init_params(G * C, (3, 3, 3, 3), generator=_g(40))
    g = _g(41)
    lists = [[(t + 0.3 * torch.randn(t.shape, generator=g)) for t in e[key]]
             for key in ("matrices", "biases", "factors")]
    packed = pack_density(*lists).detach().to(device).contiguous()
    med = (0.1 * torch.randn(G * C, generator=g)).to(device)
    y = (3 * torch.randn(G, N, C, generator=g)).to(device)
    gyh, gl = torch.randn(G, N, C, generator=g).to(device), torch.randn(G, N, C, generator=g).to(device)
    gr = torch.randn(G, N, generator=g).to(device)
    for mode in ("noise", "dequantize", "none"):
        m = med if mode == "dequantize" else None
        rho = 0.25 if mode == "noise" else 0.0
        yh, r, lik = tk.entropy_bottleneck_fwd(y, packed, m, mode, 5, 11, rho, 1.0, 1e-9, True, groups=G)
        gy, gp, gm = tk.entropy_bottleneck_bwd(y, packed, m, gyh, gr, gl, mode, 5, 11, rho, 1.0, 1e-9,
                                               groups=G)
        assert r.shape == (G, N) and gp.shape == (58, G * C)
        for k in range(G):
            cols = slice(k * C, (k + 1) * C)
            pk, mk = packed[:, cols].contiguous(), (m[cols] if m is not None else None)
            a, b, c = tk.entropy_bottleneck_fwd(y[k], pk, mk, mode, 5, 11 + k * N * C, rho, 1.0, 1e-9, True)
            assert torch.equal(a, yh[k]) and torch.equal(b, r[k]) and torch.equal(c, lik[k])
            d, e_, f = tk.entropy_bottleneck_bwd(y[k], pk, mk, gyh[k], gr[k], gl[k], mode, 5,
                                                 11 + k * N * C, rho, 1.0, 1e-9)
            assert torch.equal(d, gy[k]) and torch.equal(e_, gp[:, cols])
            assert (f is None) == (gm is None) and (f is None or torch.equal(f, gm[cols]))
    with pytest.raises(ValueError, match=r"y must be \[groups, N, C\] = \[2, N, C\]"):
        tk.entropy_bottleneck_fwd(y, packed, None, "noise", groups=2)
    with pytest.raises(ValueError, match=r"y must be \[groups, N, C\] = \[3, N, C\]"):
        tk.entropy_bottleneck_fwd(y[0], packed, None, "noise", groups=3)
    y1, r1, _ = tk.entropy_bottleneck_fwd(y[:1], packed[:, :C].contiguous(), None, "noise", groups=1)
    assert r1.shape == (1, N)  # one group: [1, N, C], not a spatial input
    with pytest.raises(ValueError, match=r"packed must be a contiguous float32 \[58, 60\]"):
        tk.entropy_bottleneck_fwd(y, packed[:, :C].contiguous(), None, "noise", groups=G)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        tk.entropy_bottleneck_fwd(y, packed, None, "noise", groups=0)
    with pytest.raises(ValueError, match="grad_rate must have 111 elements"):
        tk.entropy_bottleneck_bwd(y, packed, None, gyh, gr[0], None, "noise", groups=G)


def test_grouped_entropy_raw_op_argument_errors():
    if not _backend.has_ext_op("entropy_bottleneck_fwd"):
        pytest.skip("the C++ extension is not built")
    from cifd_kernels.ops.density_pack import pack_density
    e = eb_ref.init_params(6, (3, 3, 3, 3))
    packed = pack_density(e["matrices"], e["biases"], e["factors"]).detach()  # [58, 6]
    z, none = torch.randn(3, 4, 2), torch.empty(0)
    fwd = torch.ops.cifd_C.entropy_bottleneck_fwd
    y_hat, rate, lik = fwd(z, packed, none, 0, 1, 0, 0.0, 1.0, 1e-9, True, 3)
    assert y_hat.shape == lik.shape == (3, 4, 2) and rate.shape == (3, 4)
    with pytest.raises(RuntimeError, match="y must be \\[G=2, N, C, \\*spatial\\]"):
        fwd(z, packed, none, 0, 1, 0, 0.0, 1.0, 1e-9, True, 2)
    with pytest.raises(RuntimeError, match="packed must be \\[58, G\\*C=6\\]"):
        fwd(z, packed[:, :4], none, 0, 1, 0, 0.0, 1.0, 1e-9, True, 3)
    with pytest.raises(RuntimeError, match="medians must be \\[G\\*C=6\\]"):
        fwd(z, packed, torch.zeros(4), 1, 1, 0, 0.0, 1.0, 1e-9, True, 3)
    with pytest.raises(RuntimeError, match="groups must be >= 0"):
        fwd(z, packed, none, 0, 1, 0, 0.0, 1.0, 1e-9, True, -1)
    bwd = torch.ops.cifd_C.entropy_bottleneck_bwd
    with pytest.raises(RuntimeError, match="grad_rate must have shape \\[3, 4\\]"):
        bwd(z, packed, none, none, torch.ones(4), none, 0, 1, 0, 0.0, 1.0, 1e-9, True, 3)
    with pytest.raises(RuntimeError, match="groups must be >= 0"):
        bwd(z, packed, none, none, none, none, 0, 1, 0, 0.0, 1.0, 1e-9, True, -1)
    # groups = 0 (the default): one problem, y [N, C, *spatial]
    y_hat, rate, _ = fwd(z.reshape(4, 6), packed, none, 0, 1, 0, 0.0, 1.0, 1e-9, False)
    assert rate.shape == (4,)


@pytest.mark.parametrize("be", KERNELS)
def test_deterministic(be, device):
    _skip_unless(be, device)
    prob = _problem(3, 9 if device == "cpu" else 1025, 8, 9, 4, 7, device, seed=14)
    a = _run(be, prob, act="gelu")
    b = _run(be, prob, act="gelu")
    for u, v in zip(a[0], b[0]):
        assert torch.equal(u, v)
    assert torch.equal(a[1], b[1])
    for u, v in zip(a[3], b[3]):
        assert torch.equal(u, v)


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameters_flash_attention_rule(be, dtype, device):
    """Half parameters and x: the kernel path runs the GEMMs in dtype (outputs in dtype).
    Its error against the fp32 reference is at most 2x (+eps) that of the same eager
    bank run in dtype (ATen GEMMs and activations in dtype, the rate and loss math of
    the reference in fp32 on dtype-rounded inputs)."""
    _skip_unless(be, device)
    prob32 = _problem(3, 6, 16, 24, 5, 11, device, seed=15)
    p, lists, med, x, t, y = prob32
    to_h = lambda v: v.detach().to(dtype).requires_grad_()  # noqa: E731
    prob_h = ({k: to_h(v) for k, v in p.items()}, [[to_h(v) for v in ts] for ts in lists], med,
              x.to(dtype), t.to(dtype), y)
    exact = _run("reference", prob32, act="gelu")
    half_eager = _run_half_eager(prob_h, act="gelu")
    got = _run(be, prob_h, act="gelu")
    assert got[0].x_hat.dtype == dtype and got[1].dtype == torch.float32

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()
    for name in ("x_hat", "logits", "rate"):
        i = ref.RDMBankOutput._fields.index(name)
        scale = exact[0][i].abs().max().item()
        assert err(got[0][i], exact[0][i]) <= 2 * err(half_eager[0][i], exact[0][i]) + 1e-3 * scale, name
    assert err(got[1], exact[1]) <= 2 * err(half_eager[1], exact[1]) + 1e-3 * exact[1].abs().item()
    for j, (a, b, c) in enumerate(zip(got[3], half_eager[3], exact[3])):
        assert err(a, c) <= 2 * err(b, c) + 1e-3 * c.abs().max().item(), j


def _run_half_eager(prob, act):
    """The bank in eager torch with GEMMs and activations in the parameters' dtype (the
    flash-attention rule's "reference in low precision"); rate and loss as the reference."""
    p, (mats, biases, facs), med, x, t, y = prob
    n = p["enc1.weight"].shape[0]
    leaves = list(p.values()) + mats + biases + facs
    for v in leaves:
        v.grad = None
    lin = lambda h, w, b, a="none": ob.rdm_linear(h, p[w], p[b], a, backend="reference")  # noqa: E731
    z = lin(lin(x, "enc1.weight", "enc1.bias", act), "enc2.weight", "enc2.bias")
    z_hat = ref.quantize_latent(z.float(), "noise", 3, 5).to(z.dtype)
    lik = ref.latent_likelihood(z_hat.float(), [m.float() for m in mats], [b_.float() for b_ in biases],
                                [f.float() for f in facs])
    rate = eb_ref.rate_nats(lik.reshape(-1, lik.shape[-1])).reshape(n, -1)
    x_hat = lin(lin(z_hat, "dec1.weight", "dec1.bias", act), "dec2.weight", "dec2.bias")
    logits = lin(x_hat, "head.weight", "head.bias")
    loss, terms = ref.rdm_bank_loss(x, x_hat, logits, rate, [1.0, 0.5, 2.0], y, t, tau=2.0, lam_kl=0.7)
    out = ref.RDMBankOutput(z, z_hat, x_hat, logits, lik, rate)
    outs = [out.x_hat, out.logits, out.rate, loss]
    gs = [torch.randn(o.shape, generator=_g(50 + i)).to(o.device, o.dtype) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, gs)
    return out, loss, terms, [v.grad.clone() for v in leaves]


# --------------------------------------------------------------------------- cifd::rdm_linear
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("shared", [True, False])
def test_rdm_linear_triton_matches_aten(act, shared, device):
    backend_or_skip("triton", device)
    g = _g(20)
    n, b, i, o = 3, 37, 45, 70  # none a multiple of the tiles
    x = torch.randn((b, i) if shared else (n, b, i), generator=g).to(device).requires_grad_()
    w = torch.randn(n, o, i, generator=g).to(device).requires_grad_()
    c = torch.randn(n, o, generator=g).to(device).requires_grad_()
    gy = torch.randn(n, b, o, generator=g).to(device)
    outs = []
    for be in ("reference", "triton"):
        y = ob.rdm_linear(x, w, c, act, backend=be)
        grads = torch.autograd.grad(y, (x, w, c), gy)
        outs.append((y,) + grads)
    for a, r in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_rdm_linear_opcheck(act, device):
    backend_or_skip("triton", device)
    g = _g(21)
    x = torch.randn(3, 5, 6, generator=g).to(device).requires_grad_()
    w = torch.randn(3, 4, 6, generator=g).to(device).requires_grad_()
    c = torch.randn(3, 4, generator=g).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.cifd.rdm_linear.default, (x, w, c, act, "triton"))
    torch.library.opcheck(torch.ops.cifd.rdm_linear.default, (x[0].detach(), w, c, act, "triton"))


def test_rdm_linear_errors():
    w, c = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="act must be one of"):
        ob.rdm_linear(torch.zeros(5, 4), w, c, "tanh")
    with pytest.raises(ValueError, match="x: the weight's input width"):
        ob.rdm_linear(torch.zeros(5, 3), w, c)
    with pytest.raises(ValueError, match="x: the block count N"):
        ob.rdm_linear(torch.zeros(3, 5, 4), w, c)
    with pytest.raises(ValueError, match="share a dtype"):
        ob.rdm_linear(torch.zeros(5, 4, dtype=torch.float64), w, c)


# --------------------------------------------------------------------------- modules
def _rdm_list(device, n=3):
    torch.manual_seed(0)
    rdms = [RDM(8, 9, 4, 7, R=r, act="gelu", dist="smooth_l1", lam_kl=0.5, tau=2.0)
            for r in (1.0, 0.8, 0.6, 0.4, 0.2)[:n]]
    g = _g(3)
    with torch.no_grad():
        for r in rdms:
            for prm in r.entropy_bottleneck.parameters():
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    return [r.to(device) for r in rdms]


@pytest.mark.parametrize("be", KERNELS)
def test_bank_from_rdms_equals_rdms_one_by_one(be, device):
    """The fused bank with offset o equals RDM n run alone with offset o + n*B*L."""
    _skip_unless(be, device)
    rdms = _rdm_list(device)
    for r in rdms:
        r.backend = be
    bank = RDMBank.from_rdms(rdms)
    batch = 6
    x = torch.randn(batch, 8, generator=_g(4)).to(device)
    t = torch.randn(batch, 7, generator=_g(5)).to(device)
    y = torch.randint(0, 7, (batch,), generator=_g(6)).to(device)
    out = bank(x, t, y, seed=9, offset=40)
    out.loss.backward()
    for i, r in enumerate(rdms):
        o = r(x, t, y, seed=9, offset=40 + i * batch * 4)
        o.loss.backward()
        torch.testing.assert_close(out.x_hat[i], o.x_hat)
        torch.testing.assert_close(out.logits[i], o.logits)
        torch.testing.assert_close(out.terms["loss"][i], o.terms["loss"])
        torch.testing.assert_close(bank.enc1.weight.grad[i], r.enc1.weight.grad)
        torch.testing.assert_close(bank.head.bias.grad[i], r.head.bias.grad)
        L = 4
        torch.testing.assert_close(bank.entropy_bottleneck.matrices[2].grad[i * L:(i + 1) * L],
                                   r.entropy_bottleneck.matrices[2].grad)


@pytest.mark.parametrize("be", KERNELS)
def test_module_eval_mode(be, device):
    """Frozen bank (eval): rounded latent, no graph, same as the reference module."""
    _skip_unless(be, device)
    bank = RDMBank.from_rdms(_rdm_list(device)).eval()
    x = torch.randn(5, 8, generator=_g(7)).to(device)
    t = torch.randn(5, 7, generator=_g(8)).to(device)
    got = bank(x, t)
    bank.backend = "reference"
    want = bank(x, t)
    assert not got.x_hat.requires_grad and not got.loss.requires_grad
    torch.testing.assert_close(got.x_hat, want.x_hat)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("be", KERNELS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_targets_equal_eval_forward(be, dtype, device):
    """frozen_targets (no density, no losses) returns exactly the eval forward's x_hat and
    logits, from a module in either mode, without a graph; RDM too."""
    if be != "reference":
        _skip_unless(be, device)
    rdms = _rdm_list(device)
    bank = RDMBank.from_rdms(rdms).to(dtype)
    bank.backend = be
    x = torch.randn(5, 8, generator=_g(7)).to(device, dtype)
    bank.train()
    x_hat, logits = bank.frozen_targets(x)
    assert bank.training and not x_hat.requires_grad and not logits.requires_grad
    bank.eval()
    want = bank(x)
    assert torch.equal(x_hat, want.x_hat) and torch.equal(logits, want.logits)
    r = rdms[1].to(dtype).eval()
    r.backend = be
    xr, lr = r.frozen_targets(x)
    o = r(x)
    assert torch.equal(xr, o.x_hat) and torch.equal(lr, o.logits)


def test_compile_fullgraph_equals_eager_on_cpu():
    """torch.compile(fullgraph=True) of the bank on the C++ path equals eager (outputs
    and gradients); aot_eager, as for the other ops (see test_entropy_bottleneck)."""
    backend_or_skip("cpu", "cpu")
    rdms = _rdm_list("cpu")
    bank = RDMBank.from_rdms(rdms)
    bank.backend = "cpu"
    x = torch.randn(6, 8, generator=_g(9))
    t = torch.randn(6, 7, generator=_g(10))
    y = torch.randint(0, 7, (6,), generator=_g(11))

    def step(m):
        m.zero_grad()
        out = m(x, t, y, seed=2, offset=0)
        out.loss.backward()
        return out.loss.detach(), out.x_hat.detach(), [p.grad for p in m.parameters()]

    want = step(bank)
    compiled = torch.compile(bank, fullgraph=True, backend="aot_eager")
    got = step(compiled)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert sum(g is not None for g in want[2]) == len(want[2]) - 1  # all but the quantiles
    for a, b in zip(got[2], want[2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- fallbacks and errors
def test_auto_falls_back_and_named_backend_raises():
    prob = _problem(2, 3, 6, 7, 3, 5, "cpu", seed=16, dtype=torch.float64)
    p, (mats, biases, facs), med, x, t, y = prob
    out = ob.rdm_bank_forward(x, p, mats, biases, facs)  # auto: float64 -> the reference
    assert out.x_hat.dtype == torch.float64
    if "cpu" in _backend.implemented("rdm_bank") and _backend.status("cpu", "cpu")[0]:
        with pytest.raises(BackendUnavailableError, match="rdm_bank: backend 'cpu' needs float32"):
            ob.rdm_bank_forward(x, p, mats, biases, facs, backend="cpu")
        xf = x.float().requires_grad_()
        o = out._replace(x_hat=out.x_hat.float(), logits=out.logits.float())
        with pytest.raises(BackendUnavailableError, match="frozen x"):
            ob.rdm_bank_loss(xf, o.x_hat, o.logits, o.rate, [1.0, 2.0], backend="cpu")
        with pytest.raises(BackendUnavailableError, match="R as Python numbers"):
            ob.rdm_bank_loss(x.float(), o.x_hat, o.logits, o.rate, torch.ones(2), backend="cpu")
    with pytest.raises(BackendUnavailableError, match="rdm_bank"):
        ob.rdm_bank_forward(x, p, mats, biases, facs, backend="cuda")


def test_kernel_path_errors():
    backend_or_skip("cpu", "cpu")
    p, (mats, biases, facs), med, x, t, y = _problem(2, 3, 6, 7, 3, 5, "cpu", seed=17)
    with pytest.raises(ValueError, match="needs medians"):
        ob.rdm_bank_forward(x, p, mats, biases, facs, mode="dequantize", backend="cpu")
    with pytest.raises(ValueError, match="x: the embedding dim D"):
        ob.rdm_bank_forward(x[:, :2], p, mats, biases, facs, backend="cpu")
    with pytest.raises(ValueError, match="channel count N\\*L"):
        ob.rdm_bank_forward(x, p, [m[:2] for m in mats], [b_[:2] for b_ in biases], [f[:2] for f in facs],
                            backend="cpu")
    with pytest.raises(ValueError, match="seed must be"):
        ob.rdm_bank_forward(x, p, mats, biases, facs, seed=-1, backend="cpu")
    out = ob.rdm_bank_forward(x, p, mats, biases, facs, backend="cpu")
    with pytest.raises(ValueError, match="len\\(R\\) = 1"):
        ob.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, [1.0], backend="cpu")
    with pytest.raises(ValueError, match="labels: the batch size B"):
        ob.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, [1.0, 2.0], y[:2], backend="cpu")
    with pytest.raises(ValueError, match="empty batch"):
        ob.rdm_bank_loss(x[:0], out.x_hat[:, :0], out.logits[:, :0], out.rate[:, :0], [1.0, 2.0],
                         backend="cpu")


@pytest.mark.parametrize("be", KERNELS)
def test_forward_argument_errors_are_the_references(be, device):
    """rdm_bank_forward on a kernel backend raises the reference's error, type and message."""
    _skip_unless(be, device)
    torch.manual_seed(0)
    bank = RDMBank.from_rdms([RDM(8, 9, 4, 7, R=r) for r in (1.0, 0.5)]).to(device)
    p = {k: v for k, v in bank.named_parameters() if not k.startswith("entropy_bottleneck.")}
    eb = bank.entropy_bottleneck
    mats, biases, facs = list(eb.matrices), list(eb.biases), list(eb.factors)
    x = torch.randn(5, 8, generator=_g(22)).to(device)
    bad = [dict(act="tanh"), dict(mode="round"), dict(likelihood_bound=-1.0),
           dict(likelihood_bound=float("nan")), dict(x=x[0]), dict(x=x[:, :3]), dict(x=x.long()),
           dict(matrices=[]), dict(matrices=[m[:2] for m in mats]), dict(mode="dequantize"),
           dict(mode="dequantize", medians=torch.zeros(3, device=device)), dict(seed=-1)]
    for case in bad:
        kw = dict(case)
        xx, m = kw.pop("x", x), kw.pop("matrices", mats)
        errors = []
        for backend in ("reference", be):
            with pytest.raises((ValueError, TypeError)) as e:
                ob.rdm_bank_forward(xx, p, m, biases, facs, backend=backend, **kw)
            errors.append((e.type, str(e.value)))
        assert errors[0] == errors[1], case


@pytest.mark.parametrize("be", KERNELS)
def test_loss_argument_errors_are_the_references(be, device):
    """rdm_bank_loss on a kernel backend raises the reference's error, type and message,
    for each bad argument (the checks are the reference's own functions)."""
    _skip_unless(be, device)
    n, b, d, k = 2, 4, 3, 5
    g = _g(21)
    x = torch.randn(b, d, generator=g).to(device)
    xh = torch.randn(n, b, d, generator=g).to(device).requires_grad_()
    lg = torch.randn(n, b, k, generator=g).to(device).requires_grad_()
    r = torch.rand(n, b, generator=g).to(device)
    y = torch.randint(0, k, (b,), generator=g).to(device)
    t = torch.randn(b, k, generator=g).to(device)
    bad = [dict(R=[1.0]), dict(R=[1.0, -1.0]), dict(dist="l3"), dict(tau=0.0), dict(ignore_index=1.5),
           dict(lam_ce=-1.0), dict(lam_kl=float("nan")), dict(x=x[:, :2]), dict(x=x[:3]),
           dict(rate=r[:, :3]), dict(labels=y[:3]), dict(teacher_logits=t[:, :4]),
           dict(labels=y.float())]
    for case in bad:
        args = dict(x=x, R=[1.0, 0.5], labels=y, teacher_logits=t, rate=r) | case
        kw = {a: args.pop(a) for a in ("dist", "tau", "ignore_index", "lam_ce", "lam_kl") if a in args}
        errors = []
        for backend in ("reference", be):
            with pytest.raises((ValueError, TypeError)) as e:
                ob.rdm_bank_loss(args["x"], xh, lg, args["rate"], args["R"], args["labels"],
                                 args["teacher_logits"], backend=backend, **kw)
            errors.append((e.type, str(e.value)))
        assert errors[0] == errors[1], case


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("be", ["reference", "auto"] + KERNELS)
@pytest.mark.parametrize("bad", ["K", 10**6, -1])
def test_out_of_range_labels_raise(be, bad):
    """RDMBank (train and eval) and rdm_bank_loss on CPU tensors: a label outside [0, K)
    that is not ignore_index raises IndexError naming labels before a kernel reads it,
    the same on every backend (the reference's check); ignored rows pass. On a GPU the kernels assert on the device instead (tests/test_cifd_loss.py)."""
    if be not in ("reference", "auto"):
        _skip_unless(be, "cpu")
    K = 7
    bank = RDMBank.from_rdms(_rdm_list("cpu"))
    bank.backend = be
    x = torch.randn(6, 8, generator=_g(4))
    t = torch.randn(6, K, generator=_g(5))
    y = torch.randint(0, K, (6,), generator=_g(6))
    y[0] = bank.ignore_index
    ok = bank(x, t, y, seed=1)
    assert torch.isfinite(ok.loss)
    value = K if bad == "K" else bad
    y[3] = value
    match = rf"labels\[3\] = {value} is out of bounds for K = {K}"
    for train in (True, False):
        bank.train(train)
        with pytest.raises(IndexError, match=match):
            bank(x, t, y, seed=1)
    if be not in ("reference", "auto"):
        out = bank.eval()(x, t)
        with pytest.raises(IndexError, match=match):
            ob.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, [1.0, 0.5, 2.0], y, t, backend=be)
