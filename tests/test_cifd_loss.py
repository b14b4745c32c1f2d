# SPDX-License-Identifier: Apache-2.0
"""cifd::cifd_loss (the fused stage-2 loss) against the reference: loss, terms and the
gradients to the student's logits and embedding; keep flags exact (same Philox bits);
ignore_index rows; fp16/bf16 by the flash-attention rule; opcheck; torch.compile; the
CIFDLoss module; fallbacks and errors. The ``gpu`` tests at the end hold the CUDA
kernel to the issue's grid (M in {1, 4}, K in {7, 1000, 32001}, B in {1, 3, 1025},
odd D), to M past its register group of 8 targets, and to run-twice bit equality."""
import pytest
import torch

from cifd_kernels.backend import set_kernel_options
from cifd_kernels import BackendUnavailableError
from cifd_kernels import backend as _backend
from cifd_kernels.nn.cifd_loss import CIFDLoss
from cifd_kernels.ops.cifd_loss import cifd_loss
from cifd_kernels.reference import cifd_loss as ref
from helpers import backend_or_skip

KERNELS = ["triton", "cpu", "cuda"]
IGNORE = -100


def _skip_unless(be, device):
    if (be == "cuda") != (device == "cuda") and be != "triton":
        pytest.skip(f"{be} kernels do not take {device} tensors")
    if be not in _backend.implemented("cifd_loss"):
        pytest.skip(f"{be} cifd_loss kernels not registered in this build")
    backend_or_skip(be, device)


def _inputs(M, B, K, D, device, dtype=torch.float32, seed=0, ignore=True, emb=True):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(B, K, generator=g)
    t = z[None] + 2 * torch.randn(M, B, K, generator=g)  # targets near the student, as in training
    y = torch.randint(0, K, (B,), generator=g)
    if ignore and B >= 3:
        y[1] = IGNORE
    out = dict(student_logits=z.to(device, dtype).requires_grad_(), target_logits=t.to(device, dtype),
               labels=y.to(device), student_emb=None, target_embs=None)
    if emb:
        u = torch.randn(B, D, generator=g)
        x = u[None] + 0.8 * torch.randn(M, B, D, generator=g)  # |u - x| on both sides of 1
        out["student_emb"] = u.to(device, dtype).requires_grad_()
        out["target_embs"] = x.to(device, dtype)
    lam = [1.0] + [0.3 + 0.2 * i for i in range(M - 1)]
    return out, lam


def _run(be, inp, lam, g_out, **kw):
    loss, terms = cifd_loss(**inp, lam=lam, backend=be, **kw)
    wrt = [inp["student_logits"]] + ([inp["student_emb"]] if inp["student_emb"] is not None else [])
    grads = torch.autograd.grad(loss * g_out, wrt)
    return loss, terms, grads


def _compare(be, inp, lam, device, **kw):
    g_out = torch.randn((), generator=torch.Generator().manual_seed(9)).to(device)
    want = _run("reference", inp, lam, g_out, **kw)
    got = _run(be, inp, lam, g_out, **kw)
    assert torch.equal(got[1]["keep"], want[1]["keep"])  # same Philox bits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for k in ("ce", "kl", "emb", "rate"):
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], want[2]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# Every (M, B, dist, p_drop) at K = 7; a spread of them at K = 1000 (the interpreter is slow).
CASES = [(M, B, 7, dist, p) for M in (1, 4) for B in (1, 3, 33) for dist in ref.DISTORTIONS
         for p in (0.0, 0.5)]
CASES += [(4, 33, 1000, "mse", 0.5), (1, 1, 1000, "smooth_l1", 0.0), (4, 3, 1000, "smooth_l1", 0.5),
          (1, 33, 1000, "mse", 0.0)]


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("M,B,K,dist,p_drop", CASES)
def test_matches_reference(be, M, B, K, dist, p_drop, device):
    _skip_unless(be, device)
    inp, lam = _inputs(M, B, K, 100, device, seed=M * 1000 + B + K)
    _compare(be, inp, lam, device, tau=2.0, p_drop=p_drop, seed=M + B, offset=5, dist=dist,
             lam_ce=0.7, lam_kl=1.3, w_emb=100.0)


@pytest.mark.parametrize("be", KERNELS)
def test_without_embeddings_with_rate_and_tau_one(be, device):
    _skip_unless(be, device)
    inp, lam = _inputs(3, 5, 11, 0, device, emb=False)
    rate = torch.rand(5, device=device, requires_grad=True)
    kw = dict(tau=1.0, p_drop=0.0, ibm_rate=rate, lam_I=0.01)
    g_out = torch.tensor(0.37, device=device)
    want = _run("reference", inp, lam, g_out, **kw)
    got = _run(be, inp, lam, g_out, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1]["emb"], torch.zeros(3, device=device))
    torch.testing.assert_close(got[2][0], want[2][0], rtol=1e-4, atol=1e-6)
    ga = torch.autograd.grad(cifd_loss(**inp, lam=lam, backend=be, **kw)[0], rate)[0]
    torch.testing.assert_close(ga, torch.full_like(rate, 0.01 / 5))


@pytest.mark.parametrize("be", KERNELS)
def test_all_labels_ignored_and_lam_tensor(be, device):
    _skip_unless(be, device)
    inp, _ = _inputs(2, 4, 9, 6, device)
    inp["labels"] = torch.full((4,), IGNORE, device=device)
    lam = torch.tensor([1.0, 0.25], device=device)
    _compare(be, inp, lam, device, p_drop=0.0)


@pytest.mark.parametrize("be", KERNELS)
def test_dropped_targets_are_never_read(be, device):
    """NaN/inf in a dropped target reach neither the loss nor a gradient (reference rule)."""
    _skip_unless(be, device)
    M, seed, p = 4, 3, 0.5
    keep = ref.kd_keep_flags(M, seed, 0, p)
    assert not keep.all() and keep.any()
    inp, lam = _inputs(M, 6, 13, 8, device)
    with torch.no_grad():
        for name in ("target_logits", "target_embs"):
            inp[name][~keep.to(device)] = float("nan")
            inp[name][~keep.to(device), :, 0] = float("inf")
    _compare(be, inp, lam, device, p_drop=p, seed=seed)
    loss, _ = cifd_loss(**inp, lam=lam, p_drop=p, seed=seed, backend=be)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("be", KERNELS)
def test_noncontiguous_inputs(be, device):
    _skip_unless(be, device)
    inp, lam = _inputs(3, 7, 17, 10, device)
    z = inp["student_logits"].detach().t().contiguous().t().requires_grad_()  # column-major
    assert not z.is_contiguous()
    inp["student_logits"] = z
    inp["target_logits"] = inp["target_logits"].transpose(0, 1).contiguous().transpose(0, 1)
    inp["student_emb"] = inp["student_emb"].detach()[:, ::1].t().contiguous().t().requires_grad_()
    _compare(be, inp, lam, device, p_drop=0.25, seed=11, dist="smooth_l1")


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_flash_attention_rule(be, dtype, device):
    """Error vs the fp32 reference at most 2x (+eps) the eager reference's own error in dtype."""
    _skip_unless(be, device)
    _check_half(be, dtype, device, 4, 9, 300, 50)


def _check_half(be, dtype, device, M, B, K, D):
    inp32, lam = _inputs(M, B, K, D, device, seed=4)
    inp_h = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad)
                 if v is not None and v.is_floating_point() else v) for k, v in inp32.items()}
    kw = dict(p_drop=0.25, seed=2, dist="smooth_l1")
    g_out = torch.tensor(1.7, device=device)
    exact = _run("reference", inp32, lam, g_out, **kw)
    half_ref = _run("reference", inp_h, lam, g_out, **kw)
    half_ker = _run(be, inp_h, lam, g_out, **kw)
    assert half_ker[0].dtype == torch.float32
    for a, b in zip(half_ker[2], half_ref[2]):
        assert a.dtype == b.dtype == dtype

    def err(x, y):
        return (x.float() - y.float()).abs().max().item()
    assert err(half_ker[0], exact[0]) <= 2 * err(half_ref[0], exact[0]) + 1e-4 * exact[0].abs().item()
    for k in ("ce", "kl", "emb"):
        assert err(half_ker[1][k], exact[1][k]) <= 2 * err(half_ref[1][k], exact[1][k]) + 1e-5
    for a, b, c in zip(half_ker[2], half_ref[2], exact[2]):
        assert err(a, c) <= 2 * err(b, c) + 1e-6


def test_opcheck(device):
    """cifd::cifd_loss, the Triton kernel's op (the C++ backends' fused op: test_traced_route
    and its opcheck below)."""
    _skip_unless("triton", device)
    inp, lam = _inputs(2, 5, 12, 7, device)
    lam_t = torch.tensor(lam, device=device)
    keep = torch.tensor([True, False], device=device)
    for emb, dist in ((True, "smooth_l1"), (False, "mse")):
        u = inp["student_emb"] if emb else None
        x = inp["target_embs"] if emb else None
        torch.library.opcheck(torch.ops.cifd.cifd_loss.default,
                              (inp["student_logits"], inp["target_logits"], inp["labels"], u, x,
                               lam_t, keep, None, 2.0, 1.0, 1.0, 100.0, dist, IGNORE))


@pytest.mark.parametrize("be", KERNELS)
def test_module_equals_reference_module(be, device):
    _skip_unless(be, device)
    inp, lam = _inputs(3, 8, 20, 16, device)
    args = tuple(inp[k] for k in ("student_logits", "target_logits", "labels", "student_emb", "target_embs"))
    rate = torch.rand(8, device=device)
    for train in (True, False):
        m_ref = CIFDLoss(lam=lam, p_drop=0.5, dist="smooth_l1", backend="reference").train(train)
        m_ker = CIFDLoss(lam=lam, p_drop=0.5, dist="smooth_l1", backend=be).train(train)
        a, ta = m_ref(*args, ibm_rate=rate, seed=6, offset=2)
        b, tb = m_ker(*args, ibm_rate=rate, seed=6, offset=2)
        assert torch.equal(ta["keep"], tb["keep"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        ga = torch.autograd.grad(a, [args[0], args[3]])
        gb = torch.autograd.grad(b, [args[0], args[3]])
        for x, y in zip(gb, ga):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_compile_fullgraph_equals_eager():
    be = "cpu" if "cpu" in _backend.implemented("cifd_loss") else "triton"
    backend_or_skip(be, "cpu")
    inp, lam = _inputs(2, 4, 10, 6, "cpu")

    def f(z, t, y, u, x, seed: int):
        return cifd_loss(z, t, y, u, x, lam, p_drop=0.5, seed=seed, backend=be)[0]

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = tuple(inp[k] for k in ("student_logits", "target_logits", "labels", "student_emb", "target_embs"))
    for seed in (3, 4):
        a, b = f(*args, seed), cf(*args, seed)
        torch.testing.assert_close(b, a)
        ga = torch.autograd.grad(a, [args[0], args[3]])
        gb = torch.autograd.grad(b, [args[0], args[3]])
        for x, y in zip(gb, ga):
            torch.testing.assert_close(x, y)


def test_fallbacks_and_errors():
    """auto: float64 and targets requiring grad go to the reference; a named kernel raises."""
    be = "triton" if _backend.status("triton", "cpu")[0] else None
    inp, lam = _inputs(2, 3, 5, 4, "cpu", dtype=torch.float64)
    loss, _ = cifd_loss(**inp, lam=lam, backend="auto")
    assert loss.dtype == torch.float64  # the reference ran
    if be is None:
        pytest.skip("no kernel backend on the CPU here")
    with pytest.raises(BackendUnavailableError, match="float32"):
        cifd_loss(**inp, lam=lam, backend=be)
    inp, lam = _inputs(2, 3, 5, 4, "cpu")
    inp["target_logits"].requires_grad_()
    with pytest.raises(BackendUnavailableError, match="frozen"):
        cifd_loss(**inp, lam=lam, backend=be)
    inp["target_logits"] = inp["target_logits"].detach()
    with pytest.raises(ValueError, match="pass both or neither"):
        cifd_loss(**{**inp, "target_embs": None}, lam=lam, backend=be)
    with pytest.raises(ValueError, match="empty batch"):
        cifd_loss(torch.zeros(0, 5), torch.zeros(2, 0, 5), torch.zeros(0, dtype=torch.long), lam=lam,
                  backend=be)


@pytest.mark.parametrize("be", KERNELS)
def test_zero_width_embedding(be, device):
    """D = 0: every distortion is an empty sum (0), the embedding gradient is [B, 0]."""
    _skip_unless(be, device)
    inp, lam = _inputs(2, 4, 9, 0, device)
    _compare(be, inp, lam, device, p_drop=0.0)


# ----------------------------------------------------------------------------- CUDA kernel
def _mixed_seed(M, p_drop, offset):
    """The first seed whose keep flags drop some targets and keep others (M > 1)."""
    for seed in range(100):
        keep = ref.kd_keep_flags(M, seed, offset, p_drop)
        if M == 1 or (keep.any() and not keep.all()):
            return seed
    raise AssertionError("no mixed keep flags in 100 seeds")


# The grid; dist alternates (both are covered at every K by test_matches_reference).
CUDA_GRID = [(M, B, K, ref.DISTORTIONS[i % 2]) for i, (M, B, K) in enumerate(
    (M, B, K) for M in (1, 4) for B in (1, 3, 1025) for K in (7, 1000, 32001))]


@pytest.mark.gpu
@pytest.mark.parametrize("M,B,K,dist", CUDA_GRID)
def test_cuda_grid_matches_reference(M, B, K, dist):
    _skip_unless("cuda", "cuda")
    p = 0.5 if M > 1 else 0.0
    seed = _mixed_seed(M, p, 3)
    inp, lam = _inputs(M, B, K, 37, "cuda", seed=M + B + K)
    _compare("cuda", inp, lam, "cuda", tau=2.0, p_drop=p, seed=seed, offset=3, dist=dist,
             lam_ce=0.7, lam_kl=1.3, w_emb=100.0)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [9, 17])
@pytest.mark.parametrize("K,D", [(7, 3), (1000, 101)])
def test_cuda_many_targets(M, K, D):
    """M past the kernel's register group of 8 (extra sweeps for lse, KL and distortions),
    with dropped targets in every group holding NaN/inf that must never be read."""
    _skip_unless("cuda", "cuda")
    p = 0.4
    seed = _mixed_seed(M, p, 0)
    keep = ref.kd_keep_flags(M, seed, 0, p)
    inp, lam = _inputs(M, 5, K, D, "cuda", seed=M)
    with torch.no_grad():
        for name in ("target_logits", "target_embs"):
            inp[name][~keep.cuda()] = float("nan")
    _compare("cuda", inp, lam, "cuda", p_drop=p, seed=seed, dist="smooth_l1")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,B,K,D", [(4, 3, 32001, 37), (1, 1025, 7, 37), (4, 1025, 1000, 101)])
def test_cuda_half_types(dtype, M, B, K, D):
    _skip_unless("cuda", "cuda")
    _check_half("cuda", dtype, "cuda", M, B, K, D)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [7, 1000, 32001])
def test_cuda_deterministic_bits(K):
    """Run twice: the same bits. A row's terms depend on that row only (not on the batch)."""
    _skip_unless("cuda", "cuda")
    M, B, D = 4, 1025, 37
    inp, lam = _inputs(M, B, K, D, "cuda", seed=K)
    z, t, y = inp["student_logits"].detach(), inp["target_logits"], inp["labels"]
    u, x = inp["student_emb"].detach(), inp["target_embs"]
    lam_t = torch.tensor(lam, device="cuda")
    keep = torch.tensor([1, 0, 1, 1], dtype=torch.uint8, device="cuda")

    none = z.new_empty((0,))

    def raw(z, t, y, u, x):
        nvalid = (y != IGNORE).sum().clamp_min(1).float()
        return torch.ops.cifd_C.cifd_loss_fwd(z, t, y, u, x, lam_t, keep, nvalid, none, 2.0, 1.0,
                                              1.0, 100.0, 1, IGNORE)
    a, b = raw(z, t, y, u, x), raw(z, t, y, u, x)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    rows = torch.tensor([0, 1, 700, B - 1], device="cuda")
    sub = raw(z[rows].contiguous(), t[:, rows].contiguous(), y[rows], u[rows].contiguous(),
              x[:, rows].contiguous())
    assert torch.equal(sub[0], a[0][rows])  # ce
    assert torch.equal(sub[1], a[1][:, rows])  # kl
    assert torch.equal(sub[2], a[2][:, rows])  # distortions
    loss_a, _ = cifd_loss(**inp, lam=lam, p_drop=0.5, seed=1, backend="cuda")
    loss_b, _ = cifd_loss(**inp, lam=lam, p_drop=0.5, seed=1, backend="cuda")
    assert torch.equal(loss_a, loss_b)


@pytest.mark.gpu
def test_cuda_is_auto_on_gpu():
    _skip_unless("cuda", "cuda")
    assert _backend.resolve("cifd_loss", "auto", torch.device("cuda")) == "cuda"
    inp, lam = _inputs(3, 6, 50, 9, "cuda")
    a, _ = cifd_loss(**inp, lam=lam, p_drop=0.5, seed=2, backend="auto")
    b, _ = cifd_loss(**inp, lam=lam, p_drop=0.5, seed=2, backend="cuda")
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_limits_and_argument_errors():
    _skip_unless("cuda", "cuda")
    M = 1025  # past cifd::cuda::kCifdLossMaxTargets
    inp, _ = _inputs(M, 1, 3, 2, "cuda", ignore=False)
    lam = [1.0] * M
    with pytest.raises(BackendUnavailableError, match="at most 1024 targets"):
        cifd_loss(**inp, lam=lam, p_drop=0.0, backend="cuda")
    loss, _ = cifd_loss(**inp, lam=lam, p_drop=0.0, backend="auto")  # the reference takes it
    assert torch.isfinite(loss)
    inp, lam = _inputs(2, 3, 5, 4, "cuda")
    z, t, y = inp["student_logits"].detach(), inp["target_logits"], inp["labels"]
    lam_t = torch.tensor(lam, device="cuda")
    keep = torch.ones(2, dtype=torch.uint8, device="cuda")
    nvalid = torch.ones((), device="cuda")
    none = z.new_empty((0,))
    with pytest.raises(RuntimeError, match="labels must be on cuda"):
        torch.ops.cifd_C.cifd_loss_fwd(z, t, y.cpu(), none, none, lam_t, keep, nvalid, none, 2.0,
                                       1.0, 1.0, 1.0, 0, IGNORE)
    with pytest.raises(RuntimeError, match="targets must be contiguous"):
        torch.ops.cifd_C.cifd_loss_fwd(z, t.transpose(0, 1).contiguous().transpose(0, 1), y, none,
                                       none, lam_t, keep, nvalid, none, 2.0, 1.0, 1.0, 1.0, 0,
                                       IGNORE)


# --------------------------------------------------------------------------- groups (RDM bank stage 1)
def _grouped_inputs(G, M, B, K, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 3 * torch.randn(M, B, K, generator=g)
    z = t[:1] + 2 * torch.randn(G, B, K, generator=g)
    x = torch.randn(M, B, D, generator=g)
    u = x[:1] + 0.8 * torch.randn(G, B, D, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    y[1] = IGNORE
    gw = torch.tensor([0.5 + 1.5 * i for i in range(G)])
    return (z.to(device).requires_grad_(), t.to(device), y.to(device), u.to(device).requires_grad_(),
            x.to(device), gw.to(device))


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("M,K,dist", [(1, 7, "mse"), (2, 37, "smooth_l1"), (1, 1000, "smooth_l1")])
def test_grouped_loss_matches_per_group_reference(be, M, K, dist, device):
    """G students against shared targets in one call (the RDM bank's stage 1) equal G
    reference calls, one per group with w_emb = group_w[g]: loss, terms, gradients."""
    from cifd_kernels.ops.cifd_loss import grouped_loss
    _skip_unless(be, device)
    G, B, D = 3, 5, 11
    z, t, y, u, x, gw = _grouped_inputs(G, M, B, K, D, device, seed=K)
    kw = dict(tau=2.0, lam_ce=0.7, lam_kl=1.3, dist=dist, ignore_index=IGNORE)
    g_out = torch.randn(G, generator=torch.Generator().manual_seed(4)).to(device)
    loss, ce, kl, emb = grouped_loss(z, t, y, u, x, gw, backend=be, **kw)
    assert loss.shape == ce.shape == (G,) and kl.shape == emb.shape == (M, G)
    got = torch.autograd.grad((loss * g_out).sum(), [z, u])
    zr, ur = z.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    want_loss = []
    for i in range(G):
        li, ti = ref.cifd_loss(zr[i], t, y, ur[i], x, [1.0] * M, p_drop=0.0, w_emb=float(gw[i]), **kw)
        want_loss.append(li)
        torch.testing.assert_close(ce[i], ti["ce"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl[:, i], ti["kl"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb[:, i], ti["emb"], rtol=1e-5, atol=1e-5)
    want_loss = torch.stack(want_loss)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((want_loss * g_out).sum(), [zr, ur])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grouped_opcheck(device):
    _skip_unless("triton", device)
    z, t, y, u, x, gw = _grouped_inputs(2, 2, 4, 9, 5, device)
    lam_t = torch.tensor([1.0, 0.4], device=device)
    keep = torch.tensor([True, False], device=device)
    for w in (gw, None):
        torch.library.opcheck(torch.ops.cifd.cifd_loss.default,
                              (z, t, y, u, x, lam_t, keep, w, 2.0, 1.0, 1.0, 3.0, "mse", IGNORE))


def test_grouped_raw_op_argument_errors():
    if "cpu" not in _backend.implemented("cifd_loss"):
        pytest.skip("the C++ loss kernel is not built")
    z, t, y, u, x, gw = (v.detach() for v in _grouped_inputs(3, 1, 4, 9, 5, "cpu"))
    lam_t, keep = torch.ones(1), torch.ones(1, dtype=torch.uint8)
    nvalid = torch.ones(())
    raw = torch.ops.cifd_C.cifd_loss_fwd
    with pytest.raises(RuntimeError, match="group_w must be empty or float32 \\[G\\]"):
        raw(z, t, y, u, x, lam_t, keep, nvalid, gw[:2], 2.0, 1.0, 1.0, 1.0, 0, IGNORE)
    with pytest.raises(RuntimeError, match="group_w must be empty or float32"):
        raw(z[0], t, y, u[0], x, lam_t, keep, nvalid, gw, 2.0, 1.0, 1.0, 1.0, 0, IGNORE)
    with pytest.raises(RuntimeError, match="emb must be \\[G, 4, D\\] like logits"):
        raw(z, t, y, u[:2], x, lam_t, keep, nvalid, gw, 2.0, 1.0, 1.0, 1.0, 0, IGNORE)
    with pytest.raises(RuntimeError, match="cifd_loss_reduce: group_w must be empty or \\[G\\]"):
        torch.ops.cifd_C.cifd_loss_reduce(torch.ones(3, 4), torch.ones(1, 3, 4), torch.ones(1, 3, 4),
                                          lam_t, nvalid, gw[:2], 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- embedding-only (CLIP setting)
@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("dist,p_drop,lam_cl", [("mse", 0.0, 0.005), ("smooth_l1", 0.4, 0.0)])
def test_embedding_loss_matches_reference(be, dist, p_drop, lam_cl, device):
    """The fused embedding terms (same kernel, logit part off) + plain-torch InfoNCE and rate
    equal the reference: loss, terms, keep flags and the gradient to U and to the contrast."""
    from cifd_kernels.ops.cifd_loss import cifd_embedding_loss
    _skip_unless(be, device)
    g = torch.Generator().manual_seed(31)
    B, D, M = 7, 19, 4
    u = torch.randn(B, D, generator=g).to(device).requires_grad_()
    x = (u.detach()[None] + 0.8 * torch.randn(M, B, D, generator=g).to(device))
    c = torch.randn(B, D, generator=g).to(device).requires_grad_()
    rate = torch.rand(B, generator=g).to(device).requires_grad_()
    lam = [1.0, 0.5, 0.25, 2.0]
    kw = dict(dist=dist, w_emb=3.0, p_drop=p_drop, seed=5, offset=2, ibm_rate=rate, lam_I=0.01,
              lam_cl=lam_cl)
    out = {}
    for name in ("reference", be):
        loss, terms = cifd_embedding_loss(u, x, c, lam, backend=name, **kw)
        wrt = [u, rate] + ([c] if lam_cl else [])
        out[name] = loss, terms, torch.autograd.grad(loss * 1.3, wrt)
    want, got = out["reference"], out[be]
    assert torch.equal(got[1]["keep"], want[1]["keep"])
    if p_drop:
        assert not bool(want[1]["keep"].all())  # the seed drops at least one target
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for k in ("emb", "rate", "nce"):
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_embedding_loss_module_uses_kernels_and_errors():
    from cifd_kernels.nn.cifd_loss import CIFDEmbeddingLoss
    from cifd_kernels.ops.cifd_loss import cifd_embedding_loss
    u = torch.randn(5, 6, requires_grad=True)
    x = torch.randn(2, 5, 6)
    m = CIFDEmbeddingLoss(lam=[1.0, 0.5], lam_cl=0.0, backend="reference")
    want = m(u, x)[0]
    for be in ("cpu", "triton"):
        if be not in _backend.implemented("cifd_loss") or not _backend.status(be, "cpu")[0]:
            continue
        m.backend = be
        torch.testing.assert_close(m(u, x)[0], want)
    with pytest.raises(ValueError, match="contrast_emb is required"):
        cifd_embedding_loss(u, x, None, lam_cl=0.1, backend="auto")
    with pytest.raises(ValueError, match="M = 0 targets"):
        cifd_embedding_loss(u, x[:0], None, lam_cl=0.0, backend="auto")
    with pytest.raises(BackendUnavailableError, match="frozen targets"):
        cifd_embedding_loss(u, x.requires_grad_(), None, lam_cl=0.0, backend="triton")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduce_op_matches_the_formula(grouped, dtype):
    """cifd_C::cifd_loss_reduce (plain loops on the CPU for float32, ATen otherwise)
    against the batch-mean formula in torch."""
    if "cpu" not in _backend.implemented("cifd_loss"):
        pytest.skip("the C++ loss kernel is not built")
    g = torch.Generator().manual_seed(7)
    M, G, B = 3, 4, 33
    lead = (G, B) if grouped else (B,)
    ce_b = torch.rand(lead, generator=g, dtype=dtype)
    kl = torch.rand((M,) + lead, generator=g, dtype=dtype)
    emb = torch.rand((M,) + lead, generator=g, dtype=dtype)
    lam = torch.rand(M, generator=g, dtype=dtype)
    nvalid = torch.tensor(29.0, dtype=dtype)
    gw = torch.rand(G, generator=g, dtype=dtype) if grouped else torch.empty(0, dtype=dtype)
    loss, ce, klm, embm = torch.ops.cifd_C.cifd_loss_reduce(ce_b, kl, emb, lam, nvalid, gw, 0.7, 1.3, 2.5)
    lam_b = lam.view(-1, *([1] * (ce_b.dim() - 1)))
    want_ce = ce_b.double().sum(-1) / nvalid.double()
    want_kl = kl.double().sum(-1) / B
    want_emb = emb.double().sum(-1) / B
    emb_w = 2.5 * (gw.double() if grouped else 1.0)
    want = (0.7 * want_ce + 1.3 * (lam_b.double() * want_kl).sum(0)
            + emb_w * (lam_b.double() * want_emb).sum(0))
    assert loss.dtype == dtype and loss.shape == ((G,) if grouped else ())
    for a, b in ((loss, want), (ce, want_ce), (klm, want_kl), (embm, want_emb)):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the fused op
# cifd_C::cifd_loss_fused (python/cifd_loss_fused.cpp): what eager "cpu" calls of
# cifd_loss take; its autograd is C++. It must give the bits of the Python path it
# replaces (the tests above hold that path to the reference).
def _loss_module():
    import importlib
    return importlib.import_module("cifd_kernels.ops.cifd_loss")


def _fused_or_skip():
    import cifd_kernels._C  # noqa: F401
    if not hasattr(torch.ops.cifd_C, "cifd_loss_fused"):
        pytest.skip("_C built without cifd_loss_fused")


def _fused_backend(device) -> str:
    """The backend of ``device`` whose calls take the fused op."""
    if device == "cuda":
        _skip_unless("cuda", device)
        return "cuda"
    return "cpu"


def _counted(monkeypatch):
    """Count the fused op's calls: the list it appends to."""
    L = _loss_module()
    calls = []
    real = L._fused_op()
    monkeypatch.setattr(L, "_fused_op", lambda: (lambda *a: calls.append(1) or real(*a)))
    return calls


def _composed(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed, offset, lam_ce,
              lam_kl, w_emb, lam_I, dist, g_loss, g_rate, group_w=None):
    """The fused op's outputs and gradients by its sub-ops called one by one (keep flags,
    the label count, the kernel, the reduction, the rate term), with ``g_loss`` and
    ``g_rate`` the gradients reaching loss and rate (None: none): ``(loss, terms,
    grad_logits, grad_emb, grad_rate)``."""
    C = torch.ops.cifd_C
    M, f32 = targets.shape[0], dict(dtype=torch.float32, device=logits.device)
    keep = torch.ones(M, dtype=torch.bool, device=logits.device)
    if p_drop != 0.0:
        C.philox_keep_mask_out(keep, seed, offset, p_drop)
    nvalid = (labels != IGNORE).sum().clamp_min(1).to(torch.float32)
    none = torch.empty(0, **f32)
    gw = group_w.float() if group_w is not None else none
    e = emb.detach() if emb is not None else none
    te = target_embs.to(emb.dtype) if emb is not None else none
    ce_b, kl_mb, emb_mb, gz, gu = C.cifd_loss_fwd(
        logits.detach(), targets.to(logits.dtype), labels.long(), e, te, lam.float(), keep.to(torch.uint8),
        nvalid, gw, tau, lam_ce, lam_kl, w_emb, dist, IGNORE)
    loss, ce, kl, emb_t = C.cifd_loss_reduce(ce_b, kl_mb, emb_mb, lam, nvalid, gw, lam_ce, lam_kl, w_emb)
    rate = ibm_rate.detach().float().mean() if ibm_rate is not None else torch.zeros((), **f32)
    if ibm_rate is not None:
        loss = loss + rate * lam_I
    g_logits = g_emb = g_r = None
    if g_loss is not None:
        gs = g_loss.reshape(g_loss.shape + (1, 1))
        g_logits = gz * gs.to(gz.dtype)
        g_emb = gu * gs.to(gu.dtype) if emb is not None else None
    if ibm_rate is not None and (g_loss is not None or g_rate is not None):
        gr = g_loss * lam_I if g_loss is not None else None
        gr = g_rate if gr is None else (gr + g_rate if g_rate is not None else gr)
        B = ibm_rate.shape[0]
        g_r = (gr.expand(B) / B).to(ibm_rate.dtype)
    return loss, {"ce": ce, "kl": kl, "emb": emb_t, "keep": keep, "rate": rate, "loss": loss}, \
        g_logits, g_emb, g_r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("emb", [True, False])
@pytest.mark.parametrize("rate", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("p_drop,dist", [(0.0, "mse"), (0.5, "smooth_l1")])
@pytest.mark.parametrize("use", ["loss", "loss+rate", "rate"])
def test_fused_op_equals_its_sub_ops(dtype, emb, rate, p_drop, dist, use, device, monkeypatch):
    """Loss, every term and every gradient (logits, embedding, IBM rate) bit for bit
    against the fused op's sub-ops called by hand, with the gradient through the loss,
    the rate term, or both."""
    _fused_or_skip()
    if use != "loss" and rate is None:
        pytest.skip("no rate to differentiate")
    be = _fused_backend(device)
    inp, lam = _inputs(4, 9, 7, 5, device, dtype=dtype, seed=3, emb=emb)
    g = torch.Generator().manual_seed(4)
    ibm_rate = None if rate is None else (5 * torch.rand(9, generator=g)).to(device, rate).requires_grad_()
    wrt = [inp["student_logits"]] + ([inp["student_emb"]] if emb else []) + \
        ([ibm_rate] if rate is not None else [])
    calls = _counted(monkeypatch)
    loss, terms = cifd_loss(**inp, lam=lam, tau=1.5, p_drop=p_drop, seed=77, offset=3, dist=dist,
                            ibm_rate=ibm_rate, lam_I=0.37, w_emb=2.5, backend=be)
    assert calls == [1]
    out = {"loss": 1.7 * loss} if use == "loss" else {"rate": 0.6 * terms["rate"]}
    if use == "loss+rate":
        out["loss"] = 1.7 * loss
    grads = torch.autograd.grad(sum(out.values()), wrt, allow_unused=True)
    one = torch.ones((), device=device)
    w_loss, w_rate, w_gz, w_gu, w_gr = _composed(
        inp["student_logits"], inp["target_logits"], inp["labels"], inp["student_emb"], inp["target_embs"],
        torch.tensor(lam, device=device), ibm_rate, 1.5, p_drop, 77, 3, 1.0, 1.0, 2.5, 0.37,
        ref.DISTORTIONS.index(dist), 1.7 * one if "loss" in out else None, 0.6 * one if "rate" in out else None)
    assert torch.equal(loss, w_loss) and loss.dtype == w_loss.dtype
    assert set(terms) == set(w_rate)
    for k in terms:
        assert torch.equal(terms[k], w_rate[k]), k
        assert terms[k].requires_grad == (k == "loss" or (k == "rate" and rate is not None)), k
    want = [w_gz] + ([w_gu] if emb else []) + ([w_gr] if rate is not None else [])
    for a, b in zip(grads, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_fused_op_ignored_labels_inference_and_module():
    """All labels ignored, inference mode (no autograd key) and the CIFDLoss module in
    train mode (KD-dropout drawn per call): the values of the same calls with autograd
    and of the module's call through the functional with its seed."""
    _fused_or_skip()
    inp, lam = _inputs(3, 6, 7, 4, "cpu", seed=5)
    inp["labels"] = torch.full((6,), IGNORE)
    a = cifd_loss(**inp, lam=lam, seed=2, backend="cpu")
    with torch.inference_mode():
        b = cifd_loss(**inp, lam=lam, seed=2, backend="cpu")
    assert all(torch.equal(x, y) for x, y in zip([a[0], *a[1].values()], [b[0], *b[1].values()]))
    assert a[1]["ce"].item() == 0.0  # ce over no labels
    module = CIFDLoss(lam=lam, p_drop=0.3, w_emb=0.5).train()
    c = module(inp["student_logits"], inp["target_logits"], inp["labels"], inp["student_emb"],
               inp["target_embs"], seed=11)
    d = cifd_loss(**inp, lam=lam, p_drop=0.3, w_emb=0.5 / 4, seed=11, backend="cpu")  # the module's w_emb / D
    assert all(torch.equal(x, y) for x, y in zip([c[0], *c[1].values()], [d[0], *d[1].values()]))


def test_fused_op_argument_errors():
    """Called directly, the fused op names what is wrong."""
    _fused_or_skip()
    z, t, y = torch.randn(3, 5), torch.randn(2, 3, 5), torch.zeros(3, dtype=torch.long)
    lam = torch.ones(2)
    op = torch.ops.cifd_C.cifd_loss_fused
    with pytest.raises(RuntimeError, match="student_logits must be"):
        op(z[0], t, y, None, None, lam, None, 2.0, 0.0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0, -100)
    with pytest.raises(RuntimeError, match="go together"):
        op(z, t, y, torch.randn(3, 4), None, lam, None, 2.0, 0.0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0, -100)
    with pytest.raises(RuntimeError, match="targets"):
        op(z, t[:, :2], y, None, None, lam, None, 2.0, 0.0, 0, 0, 1.0, 1.0, 1.0, 0.0, 0, -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", ref.DISTORTIONS)
def test_fused_op_grouped_equals_its_sub_ops(dtype, dist, device, monkeypatch):
    """grouped_loss (the RDM bank's stage 1) through the fused op with group_w: loss,
    terms and gradients bit for bit against the sub-ops called by hand."""
    _fused_or_skip()
    from cifd_kernels.ops.cifd_loss import grouped_loss
    be = _fused_backend(device)
    z, t, y, u, x, gw = _grouped_inputs(3, 4, 6, 7, 5, device, seed=2)
    z, u = (v.detach().to(dtype).requires_grad_() for v in (z, u))
    t, x = t.to(dtype), x.to(dtype)
    g_out = torch.randn(3, generator=torch.Generator().manual_seed(4)).to(device)
    calls = _counted(monkeypatch)
    loss, ce, kl, emb = grouped_loss(z, t, y, u, x, gw, tau=1.5, lam_ce=0.7, lam_kl=1.3, dist=dist,
                                     ignore_index=IGNORE, backend=be)
    assert calls == [1]
    got = [loss, ce, kl, emb] + list(torch.autograd.grad((loss * g_out).sum(), [z, u]))
    w_loss, w, w_gz, w_gu, _ = _composed(z, t, y, u, x, torch.ones(4, device=device), None, 1.5, 0.0, 0, 0,
                                         0.7, 1.3, 1.0, 0.0, ref.DISTORTIONS.index(dist), g_out, None, gw)
    for a, b in zip(got, [w_loss, w["ce"], w["kl"], w["emb"], w_gz, w_gu]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert not any(v.requires_grad for v in got[1:4])  # the terms come detached


# ----------------------------------------------------------------------------- argument errors
def _same_error_as_reference(fn, be, **kw):
    errors = []
    for backend in ("reference", be):
        with pytest.raises((ValueError, TypeError, IndexError)) as e:
            fn(**kw, backend=backend)
        errors.append((e.type, str(e.value)))
    assert errors[0] == errors[1], kw


@pytest.mark.parametrize("be", KERNELS)
def test_argument_errors_are_the_references(be, device):
    """cifd_loss and cifd_embedding_loss on a kernel backend raise the reference's error,
    type and message, for each bad argument (the checks are the reference's functions)."""
    from cifd_kernels.ops.cifd_loss import cifd_embedding_loss
    _skip_unless(be, device)
    inp, lam = _inputs(3, 4, 5, 6, device)
    z, t, y, u, x = (inp[k] for k in ("student_logits", "target_logits", "labels", "student_emb",
                                      "target_embs"))
    rate = torch.rand(4, device=device)
    bad = [dict(student_logits=z[0]), dict(target_logits=t[:, :3]), dict(target_logits=t[..., :4]),
           dict(labels=y.float()), dict(labels=y[:3]), dict(target_embs=None), dict(target_embs=x[:2]),
           dict(target_embs=x[..., :5]), dict(lam=[1.0, 1.0]), dict(lam=[1.0, -1.0, 1.0]),
           dict(lam=torch.ones(2, device=device)), dict(tau=0.0), dict(p_drop=1.5), dict(dist="l1"),
           dict(seed=-1), dict(lam_ce=-1.0), dict(w_emb=float("nan")), dict(lam_I=-1.0),
           dict(ignore_index=1.5), dict(ibm_rate=rate[:3]),
           dict(student_logits=z[:0], target_logits=t[:, :0], labels=y[:0], student_emb=u[:0],
                target_embs=x[:, :0])]
    if device == "cpu":
        bad.append(dict(labels=torch.tensor([0, IGNORE, 5, 1])))
    for case in bad:
        _same_error_as_reference(cifd_loss, be, **({**inp, "lam": lam} | case))
    c = torch.randn(4, 6, device=device)
    emb = dict(student_emb=u, target_embs=x, contrast_emb=c, lam=lam)
    bad = [dict(target_embs=x[0]), dict(target_embs=x[:0]), dict(target_embs=x[:, :3]),
           dict(contrast_emb=None), dict(contrast_emb=c[:, :5]), dict(lam=[1.0]), dict(p_drop=1.5),
           dict(dist="l1"), dict(temperature=0.0), dict(lam_cl=float("nan")), dict(ibm_rate=rate[:3]),
           dict(seed=-1), dict(student_emb=u[:0], target_embs=x[:, :0], contrast_emb=c[:0])]
    for case in bad:
        _same_error_as_reference(cifd_embedding_loss, be, **(emb | case))


# ----------------------------------------------------------------------------- labels
# F.cross_entropy's rule on every backend: each label a class in [0, K) or ignore_index.
# On CPU tensors another raises IndexError naming labels before a kernel reads it (one
# message on every backend, the reference's check_labels); on a GPU the kernels
# assert on the device, which ends the process's CUDA context, so no test here can
# trigger it (csrc/tests/test_cuda_emu_loss.cpp runs the CUDA kernel's check on the
# CPU; test_triton_label_device_assert below the Triton kernel's, in the interpreter).
BAD_LABELS = ["K", 10**6, -1]


def _label_match(be, bad, K):
    return rf"labels\[2\] = {K if bad == 'K' else bad} is out of bounds for K = {K} classes"


def _with_label(inp, row, value):
    y = inp["labels"].clone()
    y[row] = value
    return {**inp, "labels": y}


@pytest.mark.parametrize("be", ["reference"] + KERNELS)
@pytest.mark.parametrize("bad", BAD_LABELS)
def test_out_of_range_labels_raise(be, bad, monkeypatch):
    """cifd_loss and the CIFDLoss module (train and eval), and grouped_loss: IndexError
    naming labels, with ignored rows in the batch."""
    from cifd_kernels.ops.cifd_loss import grouped_loss
    if be != "reference":
        _skip_unless(be, "cpu")
    K = 7
    inp, lam = _inputs(3, 5, K, 4, "cpu")
    assert inp["labels"][1] == IGNORE
    inp = _with_label(inp, 2, K if bad == "K" else bad)
    match = _label_match(be, bad, K)
    with pytest.raises(IndexError, match=match):
        cifd_loss(**inp, lam=lam, backend=be)
    args = tuple(inp[k] for k in ("student_logits", "target_logits", "labels", "student_emb", "target_embs"))
    for train in (True, False):
        with pytest.raises(IndexError, match=match):
            CIFDLoss(lam=lam, p_drop=0.5, backend=be).train(train)(*args, seed=3)
    with torch.inference_mode(), pytest.raises(IndexError, match=match):
        cifd_loss(**inp, lam=lam, backend=be)
    if be != "reference":
        z, t, _, u, x, gw = _grouped_inputs(3, 2, 5, K, 4, "cpu")
        with pytest.raises(IndexError, match=match):
            grouped_loss(z, t, inp["labels"], u, x, gw, tau=2.0, lam_ce=1.0, lam_kl=1.0, dist="mse",
                         ignore_index=IGNORE, backend=be)


@pytest.mark.parametrize("be", KERNELS)
def test_out_of_range_labels_raise_through_the_ops(be, monkeypatch):
    """The registered cifd::cifd_loss op (what torch.compile and the eager_via_ops kernel option call)
    and the raw C++ op, with every label bad."""
    _skip_unless(be, "cpu")
    set_kernel_options(eager_via_ops=True)
    inp, lam = _inputs(2, 3, 7, 4, "cpu")
    inp["labels"] = torch.tensor([7, 10**6, -1])
    with pytest.raises(IndexError, match=r"labels\[0\] = 7 is out of bounds"):
        cifd_loss(**inp, lam=lam, backend=be)
    if be == "cpu":
        z, t, y = inp["student_logits"].detach(), inp["target_logits"], inp["labels"]
        with pytest.raises(IndexError, match=r"labels\[0\] = 7 is out of bounds for K = 7"):
            torch.ops.cifd_C.cifd_loss_fwd(z, t, y, torch.empty(0), torch.empty(0), torch.ones(2),
                                           torch.ones(2, dtype=torch.uint8), torch.ones(()),
                                           torch.empty(0), 2.0, 1.0, 1.0, 1.0, 0, IGNORE)


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("ignore_index", [-1, 3, 7, 10**6])
def test_any_ignore_index_is_accepted(be, ignore_index):
    """ignore_index is left out of CE wherever it lies (negative, inside [0, K), K, far
    out), as in the reference; with ignore_index = -1, a label -100 is out of range."""
    _skip_unless(be, "cpu")
    K = 7
    inp, lam = _inputs(2, 5, K, 4, "cpu", seed=4)
    inp = _with_label(inp, 1, ignore_index)
    _compare(be, inp, lam, "cpu", p_drop=0.0, ignore_index=ignore_index)
    if ignore_index == -1:
        with pytest.raises(IndexError, match=r"labels\[2\] = -100 is out of bounds .*ignore_index = -1"):
            cifd_loss(**_with_label(inp, 2, -100), lam=lam, ignore_index=-1, backend=be)


def test_embedding_loss_has_no_labels_to_check():
    """CIFDEmbeddingLoss's kernel call passes every label ignored (K = 1): nothing to refuse."""
    from cifd_kernels.ops.cifd_loss import cifd_embedding_loss
    u, x = torch.randn(5, 6), torch.randn(2, 5, 6)
    want = cifd_embedding_loss(u, x, None, lam_cl=0.0, backend="reference")[0]
    for be in ("cpu", "triton"):
        if be in _backend.implemented("cifd_loss") and _backend.status(be, "cpu")[0]:
            torch.testing.assert_close(cifd_embedding_loss(u, x, None, lam_cl=0.0, backend=be)[0], want)


def test_triton_label_device_assert(monkeypatch):
    """The Triton kernel's own check (tl.device_assert: on a GPU, a device-side assert),
    run by the interpreter with its debug mode on and the launcher's host check off."""
    _skip_unless("triton", "cpu")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    interp = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(interp, "interpreter_builder") or "debug" not in interp.InterpreterOptions.__dataclass_fields__:
        pytest.skip("this Triton's interpreter has no debug switch to turn on")
    from cifd_kernels.ops import cifd_loss as ops_loss
    opts = dict(debug=True)
    if "sanitize_overflow" in interp.InterpreterOptions.__dataclass_fields__:
        opts["sanitize_overflow"] = False
    monkeypatch.setattr(interp.interpreter_builder, "options", interp.InterpreterOptions(**opts))
    monkeypatch.setattr(ops_loss._ref, "check_labels", lambda *a: None)
    inp, lam = _inputs(2, 4, 7, 3, "cpu")
    cifd_loss(**inp, lam=lam, backend="triton")  # valid labels (one ignored): no assert
    from triton.runtime import errors
    raised = (AssertionError, getattr(errors, "InterpreterError", AssertionError))  # the wrapper
    for bad in (7, 10**6, -1):
        with pytest.raises(raised, match=r"labels must be in \[0, K\) or ignore_index"):
            cifd_loss(**_with_label(inp, 2, bad), lam=lam, backend="triton")


def test_fused_op_is_the_traced_route_and_passes_opcheck():
    """Under torch.compile a "cpu" loss call takes the same fused op as eagerly (fake
    kernels for it and the C++ ops it calls; its forward counts the valid labels with
    ATen ops for a fake tensor): the traced forward holds the C++ loss kernel and batch
    means, no Python custom op. opcheck passes with and without KD-dropout, embeddings
    and the IBM rate, with a seed tensor, and for groups."""
    L = _loss_module()
    if L._fused_op() is None:  # registers the fakes
        pytest.skip("_C built without cifd_loss_fused")
    from functorch.compile import make_boxed_func
    op = torch.ops.cifd_C.cifd_loss_fused.default
    inp, lam = _inputs(3, 5, 7, 4, "cpu")
    args = [inp[k] for k in ("student_logits", "target_logits", "labels", "student_emb", "target_embs")]
    lam_t = torch.tensor(lam)
    rate = torch.rand(5, requires_grad=True)
    torch.library.opcheck(op, (*args, lam_t, rate, 2.0, 0.5, 3, 1, 1.0, 0.5, 10.0, 0.01, 0, IGNORE))
    # a seed tensor (drawn in a traced graph) in place of the seed
    torch.library.opcheck(op, (*args, lam_t, rate, 2.0, 0.5, 0, 1, 1.0, 0.5, 10.0, 0.01, 0, IGNORE, None,
                               torch.tensor(3)))
    torch.library.opcheck(op, (args[0], args[1], args[2], None, None, lam_t, None, 2.0, 0.0, 0, 0, 1.0, 0.5,
                               10.0, 0.0, 1, IGNORE))
    zg = args[0].detach().expand(2, 5, 7).contiguous().requires_grad_()
    ug = args[3].detach().expand(2, 5, 4).contiguous().requires_grad_()
    torch.library.opcheck(op, (zg, args[1], args[2], ug, args[4], torch.ones(3), None, 2.0, 0.0, 0, 0, 1.0,
                               0.5, 1.0, 0.0, 0, IGNORE, torch.tensor([1.0, 0.5])))

    traced = []

    def compiler(gm, _):
        traced.extend(str(n.target) for n in gm.graph.nodes
                      if n.op == "call_function" and "cifd" in str(n.target))
        return make_boxed_func(gm.forward)

    def f(z, t, y, u, x, seed: int):
        return cifd_loss(z, t, y, u, x, lam, p_drop=0.5, seed=seed, backend="cpu")[0]

    aot = torch._dynamo.backends.common.aot_autograd(fw_compiler=compiler, bw_compiler=compiler)
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend=aot)(*args, 3)
    loss.backward()
    assert "cifd_C.cifd_loss_fwd.default" in traced and "cifd_C.cifd_loss_reduce.default" in traced
    assert not any(t.startswith("cifd.") for t in traced), traced
    assert torch.equal(loss.detach(), f(*args, 3).detach())
