# SPDX-License-Identifier: Apache-2.0
"""Reference CIFD losses (distortion, tau^2 KL, CE, InfoNCE, stage-2 loss with
KD-dropout, embedding-only loss) and the CIFDLoss / CIFDEmbeddingLoss modules."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from cifd_kernels.backend import BackendUnavailableError
from cifd_kernels.nn.cifd_loss import CIFDEmbeddingLoss, CIFDLoss
from cifd_kernels.reference import cifd_loss as ref
from cifd_kernels.reference.philox import philox_keep_mask
from helpers import one_thread, seeded_randn  # noqa: F401  (one_thread: fixture)

B, K, D, M = 5, 7, 6, 4
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _g(seed):
    return torch.Generator().manual_seed(seed)


_randn = seeded_randn


def _labels(batch=B, k=K, seed=0):
    return torch.randint(0, k, (batch,), generator=_g(seed))


def _inputs(grad=True, dtype=F64, m=M, b=B, k=K, d=D):
    return dict(
        student_logits=_randn(b, k, seed=1, scale=2, dtype=dtype, grad=grad),
        target_logits=_randn(m, b, k, seed=2, scale=2, dtype=dtype, grad=grad),
        labels=_labels(b, k),
        student_emb=_randn(b, d, seed=3, dtype=dtype, grad=grad),
        target_embs=_randn(m, b, d, seed=4, dtype=dtype, grad=grad),
        ibm_rate=(torch.rand(b, generator=_g(5), dtype=F64) * 10).to(dtype).requires_grad_(grad),
    )


SMALL = dict(b=3, k=4, d=3)  # gradcheck sizes: every element costs two loss evaluations


def _mixed_seed(m=M, p=0.5):
    """A seed whose keep flags are neither all kept nor all dropped (found by scanning)."""
    for s in range(1000):
        k = philox_keep_mask((m,), s, 0, p)
        if 0 < int(k.sum()) < m:
            return s, k
    raise AssertionError("no mixed seed in 1000 tries")


def _random_backward(outputs, seed=99):
    """Backward with random grad_outputs (never a bare .sum())."""
    outs = [o for o in outputs if o.requires_grad]
    grads = [torch.randn(o.shape, generator=_g(seed + i), dtype=o.dtype) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, grads)


# --------------------------------------------------------------------------- distortion
def test_distortion_hand_values():
    a = torch.tensor([[0.0, 0.0, 1.0]])
    b = torch.tensor([[0.5, 3.0, 1.0]])
    torch.testing.assert_close(ref.distortion(a, b, "mse"), torch.tensor([0.25 + 9.0]))
    # smooth-L1, beta = 1: 0.5 * 0.5^2 + (3 - 0.5) + 0
    torch.testing.assert_close(ref.distortion(a, b, "smooth_l1"), torch.tensor([0.125 + 2.5]))


@pytest.mark.parametrize("kind, fn", [("mse", F.mse_loss), ("smooth_l1", F.smooth_l1_loss)])
def test_distortion_matches_torch_losses_summed_over_features(kind, fn):
    a, b = _randn(B, D, seed=1, scale=2), _randn(B, D, seed=2, scale=2)
    expect = fn(a, b, reduction="none").sum(-1)
    torch.testing.assert_close(ref.distortion(a, b, kind), expect)
    # broadcasting [B, D] against [M, B, D] gives [M, B], row m = dist(a, b_m)
    bm = _randn(M, B, D, seed=3)
    out = ref.distortion(a, bm, kind)
    assert out.shape == (M, B)
    for m in range(M):
        torch.testing.assert_close(out[m], fn(a, bm[m], reduction="none").sum(-1))


@pytest.mark.parametrize("kind", ref.DISTORTIONS)
def test_distortion_gradcheck(kind):
    a = _randn(B, D, seed=1, scale=2, grad=True)
    b = _randn(B, D, seed=2, scale=2, grad=True)
    # keep |a - b| away from smooth-L1's switch point at 1 (finite differences straddle it)
    with torch.no_grad():
        d = a - b
        a += torch.where((d.abs() - 1).abs() < 0.05, 0.2, 0.0)
    assert gradcheck(lambda x, y: ref.distortion(x, y, kind), (a, b))


def test_distortion_fp32_math_for_half_inputs():
    a = _randn(B, D, seed=1, dtype=torch.bfloat16)
    b = _randn(B, D, seed=2, dtype=torch.bfloat16)
    out = ref.distortion(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.distortion(a.float(), b.float()), rtol=0, atol=0)


# --------------------------------------------------------------------------- KL
def test_kl_tau_hand_values():
    # p_T uniform over 2 classes, p_S = (3/4, 1/4): KL = 0.5 ln(4/3)
    t = torch.tensor([[0.0, 0.0]])
    s1 = torch.tensor([[math.log(3.0), 0.0]])
    torch.testing.assert_close(ref.kl_tau(t, s1, 1.0), torch.tensor([0.5 * math.log(4 / 3)]))
    # same distributions at tau = 2 (logits doubled): the tau^2 factor multiplies by 4
    s2 = 2 * s1
    torch.testing.assert_close(ref.kl_tau(t, s2, 2.0), torch.tensor([2.0 * math.log(4 / 3)]))
    # KL(p || p) = 0, and softmax ignores a constant shift of the logits
    v = _randn(B, K, seed=3)
    torch.testing.assert_close(ref.kl_tau(v, v + 3.0, 1.7), torch.zeros(B, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.5])
def test_kl_tau_matches_kl_div(tau):
    t, s = _randn(B, K, seed=1, scale=3), _randn(B, K, seed=2, scale=3)
    expect = tau ** 2 * F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1),
                                 reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(ref.kl_tau(t, s, tau), expect)
    assert (ref.kl_tau(t, s, tau) > 0).all()
    # argument order matters: KL is not symmetric
    assert not torch.allclose(ref.kl_tau(t, s, tau), ref.kl_tau(s, t, tau))


def test_kl_tau_gradcheck():
    t = _randn(B, K, seed=1, scale=2, grad=True)
    s = _randn(B, K, seed=2, scale=2, grad=True)
    assert gradcheck(lambda a, b: ref.kl_tau(a, b, 2.0), (t, s))


# --------------------------------------------------------------------------- CE and InfoNCE
def test_cross_entropy_ignore_index_and_mean():
    logits, labels = _randn(B, K, seed=1), _labels()
    labels[1] = -100
    ce = ref.cross_entropy(logits, labels)
    assert ce[1] == 0
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels, reduction="none"))
    # the stage-2 CE term is the mean over non-ignored samples, torch's convention
    loss, terms = ref.cifd_loss(logits, _randn(1, B, K, seed=2), labels, p_drop=0.0)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, labels))
    # all ignored: CE term 0, not NaN
    _, terms = ref.cifd_loss(logits, _randn(1, B, K, seed=2), torch.full((B,), -100), p_drop=0.0)
    assert terms["ce"] == 0


def test_info_nce_hand_values_and_properties():
    eye = torch.eye(2, dtype=F64)
    # S = I / 1: each direction's CE is -log(e / (e + 1)) = log(1 + e^-1)
    expect = torch.full((2,), math.log1p(math.exp(-1.0)), dtype=F64)
    torch.testing.assert_close(ref.info_nce(eye, eye, 1.0), expect)
    a, b = _randn(B, D, seed=1), _randn(B, D, seed=2)
    out = ref.info_nce(a, b, 0.1)
    assert out.shape == (B,)
    # L2-normalised: scale-free in each argument
    torch.testing.assert_close(ref.info_nce(3.0 * a, 0.5 * b, 0.1), out)
    # symmetric form: swapping the two embedding sets changes nothing
    torch.testing.assert_close(ref.info_nce(b, a, 0.1), out)
    # and it is the mean of the two directions' cross-entropies
    s = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / 0.1
    idx = torch.arange(B)
    torch.testing.assert_close(out, 0.5 * (F.cross_entropy(s, idx, reduction="none")
                                           + F.cross_entropy(s.t(), idx, reduction="none")))
    # positives aligned -> lower loss than a shuffled pairing
    assert ref.info_nce(a, a + 0.01 * b, 0.1).mean() < ref.info_nce(a, b.roll(1, 0), 0.1).mean()


def test_info_nce_gradcheck():
    a = _randn(B, D, seed=1, grad=True)
    b = _randn(B, D, seed=2, grad=True)
    assert gradcheck(lambda x, y: ref.info_nce(x, y, 0.3), (a, b))


# --------------------------------------------------------------------------- stage-2 loss
def test_cifd_loss_gradcheck():
    inp = _inputs(**SMALL)
    seed, _ = _mixed_seed()
    names = ["student_logits", "target_logits", "student_emb", "target_embs", "ibm_rate"]
    lam = torch.tensor([1.0, 0.5, 0.7, 0.9], dtype=F64, requires_grad=True)

    def f(sl, tl, su, te, r, lam_):
        loss, terms = ref.cifd_loss(sl, tl, inp["labels"], su, te, lam_, tau=2.0, p_drop=0.5, seed=seed,
                                    w_emb=3.0, dist="smooth_l1", ibm_rate=r, lam_I=0.1)
        return loss, terms["kl"], terms["emb"]

    assert gradcheck(f, tuple(inp[n] for n in names) + (lam,))


def test_cifd_loss_keep_flags_and_composition():
    inp = _inputs(grad=False)
    lam = [1.0, 0.5, 0.7, 0.9]
    for seed in range(6):
        loss, terms = ref.cifd_loss(inp["student_logits"], inp["target_logits"], inp["labels"],
                                    inp["student_emb"], inp["target_embs"], lam, tau=2.0, p_drop=0.4,
                                    seed=seed, offset=11, lam_ce=0.3, lam_kl=0.7, w_emb=2.0,
                                    ibm_rate=inp["ibm_rate"], lam_I=0.05)
        keep = philox_keep_mask((M,), seed, 11, 0.4)
        assert torch.equal(terms["keep"], keep)
        assert torch.equal(ref.kd_keep_flags(M, seed, 11, 0.4), keep)
        for m in range(M):
            kl_m = ref.kl_tau(inp["target_logits"][m], inp["student_logits"], 2.0).mean()
            emb_m = ref.distortion(inp["student_emb"], inp["target_embs"][m]).mean()
            torch.testing.assert_close(terms["kl"][m], kl_m if keep[m] else torch.zeros((), dtype=F64))
            torch.testing.assert_close(terms["emb"][m], emb_m if keep[m] else torch.zeros((), dtype=F64))
        lam_t = torch.tensor(lam, dtype=F64)
        expect = (0.3 * F.cross_entropy(inp["student_logits"], inp["labels"])
                  + 0.7 * (lam_t * terms["kl"]).sum() + 2.0 * (lam_t * terms["emb"]).sum()
                  + 0.05 * inp["ibm_rate"].mean())
        torch.testing.assert_close(loss, expect)
        torch.testing.assert_close(terms["loss"], loss)


def test_cifd_loss_p_drop_extremes():
    inp = _inputs(grad=False)
    args = (inp["student_logits"], inp["target_logits"], inp["labels"], inp["student_emb"], inp["target_embs"])
    _, t0 = ref.cifd_loss(*args, p_drop=0.0, seed=3)
    assert t0["keep"].all()
    loss1, t1 = ref.cifd_loss(*args, p_drop=1.0, seed=3, lam_I=0.0)
    assert not t1["keep"].any()
    torch.testing.assert_close(loss1, F.cross_entropy(inp["student_logits"], inp["labels"]))


def test_kd_dropout_drops_a_target_completely():
    seed, keep = _mixed_seed()
    inp = _inputs()
    names = ["student_logits", "target_logits", "student_emb", "target_embs", "ibm_rate"]

    def run(tl, te):
        loss, terms = ref.cifd_loss(inp["student_logits"], tl, inp["labels"], inp["student_emb"], te,
                                    tau=2.0, p_drop=0.5, seed=seed, ibm_rate=inp["ibm_rate"])
        return loss, terms

    loss, terms = run(inp["target_logits"], inp["target_embs"])
    _random_backward([loss, terms["kl"], terms["emb"]])
    grads = {n: inp[n].grad.clone() for n in names}
    for m in range(M):
        nz_logit = grads["target_logits"][m].abs().sum() > 0
        nz_emb = grads["target_embs"][m].abs().sum() > 0
        assert bool(nz_logit) == bool(keep[m]) and bool(nz_emb) == bool(keep[m]), m
    # replace every dropped target's values with garbage (incl. NaN/inf): nothing changes
    dropped = ~keep
    with torch.no_grad():
        tl = inp["target_logits"].detach().clone()
        te = inp["target_embs"].detach().clone()
        tl[dropped] = torch.tensor(float("nan"), dtype=F64)
        te[dropped] = torch.tensor(float("inf"), dtype=F64)
    for n in names:
        inp[n].grad = None
    tl.requires_grad_()
    te.requires_grad_()
    loss2, terms2 = run(tl, te)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    _random_backward([loss2, terms2["kl"], terms2["emb"]])
    for n in ("student_logits", "student_emb", "ibm_rate"):
        torch.testing.assert_close(inp[n].grad, grads[n], rtol=0, atol=0)
    assert (tl.grad[dropped] == 0).all() and (te.grad[dropped] == 0).all()


def test_cifd_loss_without_embeddings_or_rate():
    inp = _inputs(grad=False)
    loss, terms = ref.cifd_loss(inp["student_logits"], inp["target_logits"], inp["labels"], p_drop=0.0,
                                tau=3.0, w_emb=100.0, lam_I=1.0)
    assert (terms["emb"] == 0).all() and terms["rate"] == 0
    kl = ref.kl_tau(inp["target_logits"], inp["student_logits"].unsqueeze(0), 3.0).mean(-1)
    torch.testing.assert_close(loss, F.cross_entropy(inp["student_logits"], inp["labels"]) + kl.sum())


def test_cifd_loss_half_inputs_compute_in_fp32():
    inp = _inputs(grad=False, dtype=torch.bfloat16)
    args = [inp[n] for n in ("student_logits", "target_logits", "labels", "student_emb", "target_embs")]
    loss, _ = ref.cifd_loss(*args, ibm_rate=inp["ibm_rate"], seed=2)
    assert loss.dtype == torch.float32
    up = [a.float() if a.is_floating_point() else a for a in args]
    loss32, _ = ref.cifd_loss(*up, ibm_rate=inp["ibm_rate"].float(), seed=2)
    torch.testing.assert_close(loss, loss32, rtol=0, atol=0)


# --------------------------------------------------------------------------- embedding-only
def test_cifd_embedding_loss_gradcheck_and_composition():
    inp = _inputs(**SMALL)
    c = _randn(3, 3, seed=7, grad=True)
    lam = [1.0, 0.5, 0.25, 2.0]

    def f(su, te, cc, r):
        loss, terms = ref.cifd_embedding_loss(su, te, cc, lam, dist="mse", ibm_rate=r, lam_I=0.1,
                                              lam_cl=0.5, temperature=0.2)
        return loss, terms["nce"], terms["emb"]

    args = (inp["student_emb"], inp["target_embs"], c, inp["ibm_rate"])
    assert gradcheck(f, args)
    loss, terms = ref.cifd_embedding_loss(*args[:3], lam, ibm_rate=args[3], lam_I=0.1, lam_cl=0.5,
                                          temperature=0.2)
    assert terms["keep"].all()  # p_drop defaults to 0: the paper's formula
    dist = torch.stack([ref.distortion(args[0], args[1][m]).mean() for m in range(M)])
    expect = ((torch.tensor(lam, dtype=F64) * dist).sum() + 0.1 * args[3].mean()
              + 0.5 * ref.info_nce(args[0], c, 0.2).mean())
    torch.testing.assert_close(loss, expect)


def test_cifd_embedding_loss_contrast_argument():
    su, te = _randn(B, D, seed=1), _randn(M, B, D, seed=2)
    with pytest.raises(ValueError, match="contrast_emb"):
        ref.cifd_embedding_loss(su, te)
    loss0, terms = ref.cifd_embedding_loss(su, te, lam_cl=0.0)  # no InfoNCE, no contrast needed
    assert terms["nce"] == 0
    l_teacher, _ = ref.cifd_embedding_loss(su, te, te[0], lam_cl=1.0)
    l_other, _ = ref.cifd_embedding_loss(su, te, _randn(B, D, seed=9), lam_cl=1.0)
    assert not torch.allclose(l_teacher, l_other)  # the argument is what InfoNCE pairs U with


def test_cifd_embedding_loss_dropout():
    seed, keep = _mixed_seed()
    su, te, c = _randn(B, D, seed=1), _randn(M, B, D, seed=2, grad=True), _randn(B, D, seed=3)
    loss, terms = ref.cifd_embedding_loss(su, te, c, p_drop=0.5, seed=seed)
    assert torch.equal(terms["keep"], keep)
    _random_backward([loss, terms["emb"]])
    assert (te.grad[~keep] == 0).all() and (te.grad[keep].abs().sum(-1).sum(-1) > 0).all()


# --------------------------------------------------------------------------- errors
def _bad_calls():
    sl, tl, y = _randn(B, K, seed=1), _randn(M, B, K, seed=2), _labels()
    su, te = _randn(B, D, seed=3), _randn(M, B, D, seed=4)
    meta = torch.empty(B, K, device="meta")
    return [
        ("rank", lambda: ref.cifd_loss(sl[0], tl, y), ValueError, "student_logits must have 2 dims"),
        ("target rank", lambda: ref.cifd_loss(sl, tl[0], y), ValueError, "target_logits must have 3 dims"),
        ("B", lambda: ref.cifd_loss(sl, tl[:, :3], y), ValueError, "target_logits: the batch size B"),
        ("K", lambda: ref.cifd_loss(sl, tl[..., :3], y), ValueError, "target_logits: the class count K"),
        ("labels B", lambda: ref.cifd_loss(sl, tl, y[:2]), ValueError, "labels: the batch size B"),
        ("labels dtype", lambda: ref.cifd_loss(sl, tl, y.double()), TypeError, "labels must be an integer"),
        ("labels swapped", lambda: ref.cifd_loss(sl, y, tl), TypeError, "target_logits must be a floating"),
        ("M emb", lambda: ref.cifd_loss(sl, tl, y, su, te[:2]), ValueError, "target_embs: the number of targets M"),
        ("D", lambda: ref.cifd_loss(sl, tl, y, su, te[..., :2]), ValueError, "target_embs: the embedding dim D"),
        ("emb pair", lambda: ref.cifd_loss(sl, tl, y, su, None), ValueError, "student_emb and target_embs"),
        ("lam len", lambda: ref.cifd_loss(sl, tl, y, lam=[1.0, 1.0]), ValueError, "lam must have M = 4"),
        ("rate B", lambda: ref.cifd_loss(sl, tl, y, ibm_rate=torch.ones(2)), ValueError, "ibm_rate: the batch"),
        ("tau", lambda: ref.cifd_loss(sl, tl, y, tau=0.0), ValueError, "tau must be"),
        ("p_drop", lambda: ref.cifd_loss(sl, tl, y, p_drop=1.5), ValueError, "p_drop must be"),
        ("p_drop neg", lambda: ref.cifd_loss(sl, tl, y, p_drop=-0.1), ValueError, "p_drop must be"),
        ("dist", lambda: ref.cifd_loss(sl, tl, y, dist="l2"), ValueError, "dist must be one of"),
        ("device", lambda: ref.cifd_loss(meta, tl, y), ValueError, "target_logits is on cpu but student_logits"),
        ("empty", lambda: ref.cifd_loss(sl[:0], tl[:, :0], y[:0]), ValueError, "empty batch"),
        ("M=0", lambda: ref.cifd_loss(sl, tl[:0], y), ValueError, "M = 0"),
        ("kl K", lambda: ref.kl_tau(sl, sl[:, :3], 1.0), ValueError, "class dim K"),
        ("kl tau", lambda: ref.kl_tau(sl, sl, -1.0), ValueError, "tau must be"),
        ("dist bcast", lambda: ref.distortion(su, su[:3].unsqueeze(1)), None, None),
        ("dist D", lambda: ref.distortion(su, su[:, :2]), ValueError, "feature dim"),
        ("nce temp", lambda: ref.info_nce(su, su, 0.0), ValueError, "temperature must be"),
        ("nce B", lambda: ref.info_nce(su, su[:2]), ValueError, "b: the batch size B"),
        ("emb empty", lambda: ref.cifd_embedding_loss(su[:0], te[:, :0], lam_cl=0.0), ValueError, "empty batch"),
        ("emb D", lambda: ref.cifd_embedding_loss(su, te, su[:, :2]), ValueError, "contrast_emb: the embedding"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_clear_errors(case):
    name, call, exc, match = _bad_calls()[case]
    if exc is None:  # broadcastable shapes are fine: [3, 1, D] against [B, D] -> [3, B]
        assert call().shape == (3, B)
        return
    with pytest.raises(exc, match=match):
        call()


def test_per_sample_functions_accept_an_empty_batch():
    e = torch.zeros(0, D)
    assert ref.distortion(e, e).shape == (0,)
    assert ref.kl_tau(e, e, 2.0).shape == (0,)


# --------------------------------------------------------------------------- modules
def test_cifd_loss_module_defaults_are_the_papers():
    mod = CIFDLoss()
    assert (mod.lam_ce, mod.lam_kl, mod.tau, mod.p_drop, mod.w_emb, mod.lam_I, mod.dist) == \
        (1.0, 1.0, 2.0, 0.25, 100.0, 0.005, "mse")


def test_cifd_loss_module_matches_functional():
    inp = _inputs(grad=False, dtype=torch.float32)
    # The reference backend: this checks the module's wiring (argument order, units,
    # dropout), exactly; the kernels against the reference are test_cifd_loss.py's.
    mod = CIFDLoss(lam=[1.0, 0.5, 0.5, 0.5], p_drop=0.5, dist="smooth_l1", backend="reference")
    args = (inp["student_logits"], inp["target_logits"], inp["labels"], inp["student_emb"], inp["target_embs"])
    loss, terms = mod(*args, ibm_rate=inp["ibm_rate"], seed=5, offset=3)
    # The module's w_emb (default 100) is in the paper's units (mean over D): the
    # functional, on the per-sample sum, gets w_emb / D.
    D = inp["student_emb"].shape[1]
    loss_f, terms_f = ref.cifd_loss(args[0], args[1], args[2], args[3], args[4], [1.0, 0.5, 0.5, 0.5],
                                    p_drop=0.5, seed=5, offset=3, dist="smooth_l1", ibm_rate=inp["ibm_rate"],
                                    w_emb=100.0 / D)
    torch.testing.assert_close(loss, loss_f, rtol=0, atol=0)
    assert torch.equal(terms["keep"], philox_keep_mask((M,), 5, 3, 0.5))
    # seed None: drawn from torch's CPU generator, so manual_seed makes it repeatable
    torch.manual_seed(0)
    a, _ = mod(*args)
    torch.manual_seed(0)
    b, _ = mod(*args)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # eval: KD-dropout off, every target kept
    mod.eval()
    _, t_eval = mod(*args, seed=5, offset=3)
    assert t_eval["keep"].all()


def test_cifd_embedding_loss_module():
    su, te, c = _randn(B, D, seed=1, dtype=torch.float32), _randn(M, B, D, seed=2, dtype=torch.float32), \
        _randn(B, D, seed=3, dtype=torch.float32)
    mod = CIFDEmbeddingLoss(lam_cl=0.005, temperature=0.1)
    loss, _ = mod(su, te, c)
    expect, _ = ref.cifd_embedding_loss(su, te, c, lam_cl=0.005, temperature=0.1)
    torch.testing.assert_close(loss, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "auto", None])
def test_cifd_loss_module_backends_that_run(backend):
    inp = _inputs(grad=False, dtype=torch.float32)
    loss, _ = CIFDLoss(backend=backend)(inp["student_logits"], inp["target_logits"], inp["labels"], seed=1)
    assert torch.isfinite(loss)


def test_cifd_loss_module_unavailable_backend_raises():
    inp = _inputs(grad=False, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="cifd_loss"):  # no CUDA kernel yet, CPU tensors
        CIFDLoss(backend="cuda")(inp["student_logits"], inp["target_logits"], inp["labels"], seed=1)


def test_cifd_loss_module_bad_hparams():
    with pytest.raises(ValueError, match="p_drop"):
        CIFDLoss(p_drop=2.0)
    with pytest.raises(ValueError, match="tau"):
        CIFDLoss(tau=0)
    with pytest.raises(ValueError, match="backend"):
        CIFDLoss(backend="tpu")


def test_cifd_loss_on_device_with_noncontiguous_inputs(device):
    """Same loss, flags and gradients on every device and for strided inputs."""
    inp = _inputs(grad=False)
    names = ["student_logits", "target_logits", "student_emb", "target_embs", "ibm_rate"]
    kw = dict(tau=2.0, p_drop=0.5, seed=4, offset=2, dist="smooth_l1", lam_I=0.1)

    def run(t):
        leaves = {n: t[n].detach().clone().requires_grad_() for n in names}
        loss, terms = ref.cifd_loss(leaves["student_logits"], leaves["target_logits"], t["labels"],
                                    leaves["student_emb"], leaves["target_embs"], ibm_rate=leaves["ibm_rate"], **kw)
        _random_backward([loss])
        return loss, terms["keep"], {n: leaves[n].grad for n in names}

    loss_ref, keep_ref, grads_ref = run(inp)
    # non-contiguous views with the same values, on the device under test
    strided = {
        "student_logits": inp["student_logits"].t().contiguous().t(),
        "target_logits": inp["target_logits"].transpose(0, 1).contiguous().transpose(0, 1),
        "student_emb": torch.stack([inp["student_emb"]] * 2, -1)[..., 0],
        "target_embs": inp["target_embs"].permute(2, 1, 0).contiguous().permute(2, 1, 0),
        "ibm_rate": torch.stack([inp["ibm_rate"]] * 3, 0)[1],
        "labels": torch.stack([inp["labels"]] * 2, 1)[:, 0],
    }
    strided = {n: t.to(device) for n, t in strided.items()}
    assert not strided["student_logits"].is_contiguous() or device != "cpu"
    loss, keep, grads = run(strided)
    torch.testing.assert_close(loss.cpu(), loss_ref)
    assert torch.equal(keep.cpu(), keep_ref)
    for n in names:
        torch.testing.assert_close(grads[n].cpu(), grads_ref[n])
