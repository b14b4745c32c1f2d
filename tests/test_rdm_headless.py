# SPDX-License-Identifier: Apache-2.0
"""Head-less RDMs (K = 0, the paper's CLIP setting; issue 16, part 1): no head, logits
[N, B, 0], stage-1 loss R * dist + rate. Every backend against the eager reference
(outputs, loss, terms, every gradient); a head-less bank equals a headed one with the
same encoder/decoder and no logit terms; state dicts, from_rdms / split, eval mode,
frozen targets and one RDM; labels or teacher logits refused on every backend; the
kernels' K = 0 (the fused loss kernel with its logit part off); float64 gradcheck; and
a short training run on a rate-distortion curve."""
import pytest
import torch
from torch.autograd import gradcheck

from cifd_kernels.nn.rdm import RDM, RDMBank
from cifd_kernels.ops import cifd_loss as ol
from cifd_kernels.ops import rdm_bank as ob
from cifd_kernels.reference import entropy_bottleneck as eb_ref
from cifd_kernels.reference import rdm as ref
from helpers import backend_or_skip, one_thread, seeded_randn  # noqa: F401  (one_thread: fixture)

KERNELS = ["cpu", "triton", "cuda"]
R5 = (1.0, 0.5, 2.0, 0.1, 3.0)


def _skip_unless(be, device):
    if be in ("cpu", "cuda") and be != device:
        pytest.skip(f"{be} kernels do not take {device} tensors")
    backend_or_skip(be, device)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _problem(n, b, d, h, l, device, seed=0, dtype=torch.float32):
    """Head-less bank parameters (no head.*), a perturbed entropy model over n*l
    channels, its medians and x."""
    p = ref.init_params(n, d, h, l, 0, generator=_g(seed))
    e = eb_ref.init_params(n * l, (3, 3, 3, 3), generator=_g(seed + 1))
    g = _g(seed + 2)
    lists = [[(t + 0.3 * torch.randn(t.shape, generator=g)) for t in e[key]]
             for key in ("matrices", "biases", "factors")]
    med = 0.3 * torch.randn(n * l, generator=g)
    x = 2.0 * torch.randn(b, d, generator=g)
    leaf = lambda v: v.to(device, dtype).requires_grad_()  # noqa: E731
    return ({key: leaf(v) for key, v in p.items()}, [[leaf(v) for v in ts] for ts in lists],
            med.to(device), x.to(device, dtype))


def _run(be, prob, *, act="relu", mode="noise", dist="mse", seed=3, offset=5):
    """Forward, loss and a backward with random weights on x_hat, rate and the loss;
    returns (outputs, loss, terms, gradients of every leaf)."""
    p, (mats, biases, facs), med, x = prob
    n = p["enc1.weight"].shape[0]
    leaves = list(p.values()) + mats + biases + facs
    for v in leaves:
        v.grad = None
    kw = dict(act=act, mode=mode, seed=seed, offset=offset)
    lkw = dict(dist=dist, tau=2.0, lam_kl=0.7)  # lam_* weigh nothing head-less
    if be == "reference":
        out = ref.rdm_bank_forward(x, p, mats, biases, facs, med, **kw)
        loss, terms = ref.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, list(R5[:n]), **lkw)
    else:
        out = ob.rdm_bank_forward(x, p, mats, biases, facs, med, backend=be, **kw)
        loss, terms = ob.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, list(R5[:n]), backend=be, **lkw)
    outs = [o for o in (out.x_hat, out.rate, loss) if o.requires_grad]
    if outs:
        gs = [torch.randn(o.shape, generator=_g(50 + i)).to(o.device, o.dtype) for i, o in enumerate(outs)]
        torch.autograd.backward(outs, gs)
    return out, loss, terms, [v.grad.clone() if v.grad is not None else None for v in leaves]


def _compare(be, prob, rtol=1e-4, atol=1e-5, **kw):
    """The kernel path against the reference, with test_rdm_bank.py's tolerances and
    reasons: fp32 GEMMs and sums in other orders (the noise bits are the same)."""
    want = _run("reference", prob, **kw)
    got = _run(be, prob, **kw)
    for name, a, b in zip(ref.RDMBankOutput._fields, got[0], want[0]):
        if name == "logits":
            assert a.shape == b.shape == (*got[0].x_hat.shape[:2], 0) and a.dtype == got[0].x_hat.dtype
            assert not a.requires_grad
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)
    assert set(got[2]) == set(want[2]) == {"dist", "rate", "ce", "kl", "loss"}
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], rtol=rtol, atol=atol, msg=key)
    for key in ("ce", "kl"):  # no logit terms: exact zeros everywhere
        assert torch.equal(got[2][key], torch.zeros_like(got[2][key])), key
        assert torch.equal(want[2][key], torch.zeros_like(want[2][key])), key
    for i, (a, b) in enumerate(zip(got[3], want[3])):
        assert (a is None) == (b is None), i
        if a is not None:
            # parameter gradients are sums over the batch: the slack scales with their size
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=rtol, atol=max(atol, 1e-5 * scale), msg=f"grad {i}")
    return got


# --------------------------------------------------------------------------- every backend = the reference
@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("act,dist", [("relu", "mse"), ("gelu", "smooth_l1")])
@pytest.mark.parametrize("n", [1, 3])
def test_matches_reference(be, act, dist, n, device):
    _skip_unless(be, device)
    got = _compare(be, _problem(n, 5, 10, 12, 4, device, seed=n), act=act, dist=dist)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in got[3])


@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("mode", ["dequantize", "none"])
def test_channel_modes(be, mode, device):
    _skip_unless(be, device)
    _compare(be, _problem(3, 4, 8, 9, 5, device, seed=11), mode=mode, act="gelu")


@pytest.mark.parametrize("be", KERNELS)
def test_odd_sizes(be, device):
    """D = 100, H = 37, L = 17, B = 33: none a multiple of a tile or a vector."""
    _skip_unless(be, device)
    _compare(be, _problem(2, 33, 100, 37, 17, device, seed=7), act="gelu", rtol=2e-4, atol=2e-5)


def test_reference_loss_is_r_dist_plus_rate():
    """The reference's head-less loss is exactly R * dist + rate (no logit term)."""
    p, (mats, biases, facs), med, x = _problem(3, 4, 6, 7, 3, "cpu", seed=30)
    out = ref.rdm_bank_forward(x, p, mats, biases, facs, med, seed=1)
    loss, terms = ref.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, [1.0, 0.5, 2.0], dist="smooth_l1")
    R = torch.tensor([1.0, 0.5, 2.0])
    assert torch.equal(terms["loss"], R * terms["dist"] + terms["rate"])
    assert torch.equal(loss, terms["loss"].sum())


# --------------------------------------------------------------------------- = headed, no logit terms
def _headed_twin(headless: RDMBank, K: int = 7) -> RDMBank:
    """A headed bank with the same encoder, decoder and entropy model, ``lam_ce = lam_kl = 0``."""
    hp = headless._hparams()
    hp.update(lam_ce=0.0, lam_kl=0.0)
    torch.manual_seed(123)
    twin = RDMBank(headless.n, headless.D, headless.H, headless.L, K, R=headless.R, **hp)
    missing, unexpected = twin.load_state_dict(headless.state_dict(), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    return twin


def _bank(device, n=3, backend=None, **kw):
    torch.manual_seed(0)
    bank = RDMBank(n, 8, 9, 4, 0, R=list(R5[:n]), act="gelu", dist="smooth_l1", backend=backend, **kw)
    g = _g(3)
    with torch.no_grad():
        for prm in bank.entropy_bottleneck.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    return bank.to(device)


@pytest.mark.parametrize("be", ["reference"] + KERNELS)
def test_equals_headed_bank_without_logit_terms(be, device):
    """K = 0 is the headed bank with lam_ce = lam_kl = 0 and no labels or teacher: the same
    x_hat, rate, dist, loss and encoder/decoder/entropy gradients, to the bit (the same
    ops; the headed path's logit terms and their gradients are exact zeros)."""
    if be != "reference":
        _skip_unless(be, device)
    bank = _bank(device, backend=be)
    twin = _headed_twin(bank).to(device)
    x = torch.randn(6, 8, generator=_g(4)).to(device)
    a = bank(x, seed=9, offset=2)
    b = twin(x, seed=9, offset=2)
    a.loss.backward()
    b.loss.backward()
    assert a.logits.shape == (3, 6, 0) and b.logits.shape == (3, 6, 7)
    for name in ("x_hat", "rate", "likelihoods", "loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for key in ("dist", "rate", "ce", "kl", "loss"):
        assert torch.equal(a.terms[key], b.terms[key]), key
    got = dict(bank.named_parameters())
    for name, prm in twin.named_parameters():
        if name.startswith("head."):
            continue
        ga, gb = got[name].grad, prm.grad
        assert (ga is None) == (gb is None), name
        if ga is not None:
            assert torch.equal(ga, gb), name


# --------------------------------------------------------------------------- the kernels at K = 0
@pytest.mark.parametrize("be", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_kernel_takes_k_zero(be, dtype, device):
    """The fused loss kernel (grouped, as the bank calls it) with K = 0 logits, every label
    ignored and lam_ce = lam_kl = 0: ce and kl exact zeros, no NaN, and the loss and the
    embedding part (values and gradient) equal to the same call with K = 5 logits."""
    _skip_unless(be, device)
    g = _g(60)
    G, B, D = 3, 7, 11
    u = torch.randn(G, B, D, generator=g).to(device, dtype).requires_grad_()
    x = torch.randn(1, B, D, generator=g).to(device, dtype)
    labels = torch.full((B,), -100, dtype=torch.long, device=device)
    w = torch.tensor([1.0, 0.5, 2.0], device=device)
    g_loss = torch.randn(G, generator=g).to(device)
    res = []
    for k in (0, 5):
        z = torch.randn(G, B, k, generator=_g(61)).to(device, dtype).requires_grad_()
        loss, ce, kl, emb = ol.grouped_loss(z, z[0].detach()[None], labels, u, x, w, tau=2.0, lam_ce=0.0,
                                            lam_kl=0.0, dist="mse", ignore_index=-100, backend=be)
        gu, gz = torch.autograd.grad(loss, (u, z), g_loss)
        assert torch.equal(ce, torch.zeros_like(ce))
        if k == 0:  # (with K = 5 the unweighted KL against the stand-in target is computed)
            assert torch.equal(kl, torch.zeros_like(kl))
        assert torch.isfinite(loss).all() and torch.isfinite(gu).all()
        assert torch.equal(gz, torch.zeros_like(gz))
        res.append((loss, emb, gu))
    for a, b in zip(*res):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- modules
def test_state_dict_has_no_head():
    bank = RDMBank(3, 8, 9, 4, 0)
    rdm = RDM(8, 9, 4, 0)
    for m in (bank, rdm):
        assert m.head is None and m.K == 0
        keys = list(m.state_dict())
        assert keys and not any(k.startswith("head") for k in keys)
        assert not any(n.startswith("head") for n, _ in m.named_parameters())
        assert "K=0" in repr(m)
    headed = RDMBank(3, 8, 9, 4, 7)
    with pytest.raises(RuntimeError, match="Unexpected key.*head"):
        bank.load_state_dict(headed.state_dict())
    other = RDMBank(3, 8, 9, 4, 0)
    other.load_state_dict(bank.state_dict())
    for k, v in bank.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def _rdm_list(device, n=3):
    torch.manual_seed(0)
    rdms = [RDM(8, 9, 4, 0, R=r, act="gelu", dist="smooth_l1") for r in (1.0, 0.8, 0.6)[:n]]
    g = _g(3)
    with torch.no_grad():
        for r in rdms:
            for prm in r.entropy_bottleneck.parameters():
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    return [r.to(device) for r in rdms]


def test_from_rdms_split_round_trip():
    rdms = _rdm_list("cpu")
    bank = RDMBank.from_rdms(rdms)
    assert bank.K == 0 and bank.head is None and bank.R == (1.0, 0.8, 0.6)
    back = bank.split()
    for a, b in zip(rdms, back):
        assert b.K == 0 and b.head is None
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    with pytest.raises(ValueError, match=r"rdms\[1\] has \(D, H, L, K\) = \(8, 9, 4, 7\)"):
        RDMBank.from_rdms([rdms[0], RDM(8, 9, 4, 7, act="gelu", dist="smooth_l1")])


@pytest.mark.parametrize("be", ["reference"] + KERNELS)
def test_bank_from_rdms_equals_rdms_one_by_one(be, device):
    """The bank with offset o equals head-less RDM n alone with offset o + n*B*L; an RDM
    (N = 1) head-less has [B, 0] logits and 0-dim terms."""
    if be != "reference":
        _skip_unless(be, device)
    rdms = _rdm_list(device)
    for r in rdms:
        r.backend = be
    bank = RDMBank.from_rdms(rdms)
    batch = 6
    x = torch.randn(batch, 8, generator=_g(4)).to(device)
    out = bank(x, seed=9, offset=40)
    out.loss.backward()
    for i, r in enumerate(rdms):
        o = r(x, seed=9, offset=40 + i * batch * 4)
        o.loss.backward()
        assert o.logits.shape == (batch, 0) and o.x_hat.shape == (batch, 8) and o.rate.shape == (batch,)
        assert all(v.dim() == 0 for v in o.terms.values())
        assert o.terms["ce"] == 0 and o.terms["kl"] == 0
        torch.testing.assert_close(out.x_hat[i], o.x_hat)
        torch.testing.assert_close(out.terms["loss"][i], o.terms["loss"])
        torch.testing.assert_close(bank.dec2.weight.grad[i], r.dec2.weight.grad)
        torch.testing.assert_close(bank.entropy_bottleneck.matrices[2].grad[i * 4:(i + 1) * 4],
                                   r.entropy_bottleneck.matrices[2].grad)


@pytest.mark.parametrize("be", KERNELS)
def test_eval_mode_and_frozen_targets(be, device):
    """Frozen (eval, dequantize): no graph, equal to the reference backend; frozen_targets
    is exactly the eval forward's (x_hat, [N, B, 0] logits); an RDM alike."""
    _skip_unless(be, device)
    bank = _bank(device, backend=be).eval()
    x = torch.randn(5, 8, generator=_g(7)).to(device)
    got = bank(x)
    assert not got.x_hat.requires_grad and not got.loss.requires_grad
    assert got.logits.shape == (3, 5, 0)
    x_hat, logits = bank.frozen_targets(x)
    assert torch.equal(x_hat, got.x_hat) and logits.shape == (3, 5, 0)
    bank.backend = "reference"
    want = bank(x)
    torch.testing.assert_close(got.x_hat, want.x_hat)
    torch.testing.assert_close(got.rate, want.rate)
    torch.testing.assert_close(got.loss, want.loss)
    r = bank.split()[1].eval()
    r.backend = be
    xr, lr = r.frozen_targets(x)
    o = r(x)
    assert torch.equal(xr, o.x_hat) and lr.shape == o.logits.shape == (5, 0)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("be", ["reference", "auto"] + KERNELS)
def test_labels_or_teacher_refused(be):
    """Labels or teacher logits given to a head-less bank raise ValueError naming them, in
    train and eval mode, before any backend runs; the functional loss likewise, with the
    reference's message on every backend."""
    if be not in ("reference", "auto"):
        _skip_unless(be, "cpu")
    bank = _bank("cpu", backend=be)
    x = torch.randn(6, 8, generator=_g(4))
    y = torch.zeros(6, dtype=torch.long)
    t = torch.randn(6, 0)
    for train in (True, False):
        bank.train(train)
        with pytest.raises(ValueError, match=r"^RDMBank has no head \(K = 0\): labels must be None"):
            bank(x, labels=y)
        with pytest.raises(ValueError, match=r"^RDMBank has no head \(K = 0\): teacher_logits must be None"):
            bank(x, teacher_logits=t)
    with pytest.raises(ValueError, match=r"^RDM has no head \(K = 0\): labels must be None"):
        bank.split()[0](x, None, y)
    out = bank.eval()(x)
    fn = ref.rdm_bank_loss if be == "reference" else ob.rdm_bank_loss
    kw = {} if be == "reference" else {"backend": be}
    for name, args in (("labels", (y, None)), ("teacher_logits", (None, t))):
        msg = rf"^rdm_bank_loss: the bank has no head \(K = 0\): {name} must be None"
        with pytest.raises(ValueError, match=msg):
            fn(x, out.x_hat, out.logits, out.rate, [1.0, 0.5, 2.0], *args, **kw)
    with pytest.raises(ValueError, match="labels must be None"):
        ref.rdm_loss(x, out.x_hat[0], out.logits[0], out.rate[0], 1.0, y)


def test_negative_k_and_bad_layouts_rejected():
    for make in (lambda: RDMBank(2, 8, 9, 4, -1), lambda: RDM(8, 9, 4, -1)):
        with pytest.raises(ValueError, match=r"^K must be an int >= 0, got -1"):
            make()
    with pytest.raises(TypeError, match="K must be an int"):
        RDMBank(2, 8, 9, 4, 0.0)
    with pytest.raises(ValueError, match="k must be an int >= 0, got -1"):
        ref.init_params(2, 8, 9, 4, -1)
    p = ref.init_params(2, 8, 9, 4, 0)
    assert set(p) == set(ref.param_names(0)) and ref.bank_sizes(p) == (2, 8, 9, 4, 0)
    with pytest.raises(KeyError, match="omits both head.weight and head.bias"):
        ref.bank_sizes({**p, "head.weight": torch.zeros(2, 3, 8)})
    with pytest.raises(ValueError, match="K = 0 rows: a head-less bank omits"):
        ref.bank_sizes({**p, "head.weight": torch.zeros(2, 0, 8), "head.bias": torch.zeros(2, 0)})
    singles = ref.unstack_params(p)
    assert set(singles[0]) == set(ref.param_names(0))
    restacked = ref.stack_params(singles)
    assert all(torch.equal(restacked[k], p[k]) for k in p)
    headed = ref.unstack_params(ref.init_params(2, 8, 9, 4, 3))
    with pytest.raises(ValueError, match=r"singles\[1\] has a head but singles\[0\] has none"):
        ref.stack_params([singles[0], headed[0]])


# --------------------------------------------------------------------------- gradcheck
def test_headless_loss_gradcheck(one_thread):
    """float64 gradcheck of the head-less reference forward + loss (noise mode) in x, R,
    every parameter and the entropy model."""
    n, d, h, l, b = 2, 3, 3, 2, 3
    p = {k: v.double().requires_grad_() for k, v in ref.init_params(n, d, h, l, 0, generator=_g(0)).items()}
    e = eb_ref.init_params(n * l, (2, 2), generator=_g(1))
    g = _g(2)
    mats, biases, facs = [[(t.double() + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64))
                           .requires_grad_() for t in e[key]] for key in ("matrices", "biases", "factors")]
    x = seeded_randn(b, d, seed=4, grad=True)
    R = torch.tensor([1.5, 0.7], dtype=torch.float64, requires_grad=True)
    names = list(p)

    def f(x_, R_, *flat):
        ps = dict(zip(names, flat[:len(names)]))
        rest = list(flat[len(names):])
        m_, b_, f_ = rest[:len(mats)], rest[len(mats):2 * len(mats)], rest[2 * len(mats):]
        out = ref.rdm_bank_forward(x_, ps, m_, b_, f_, act="gelu", mode="noise", seed=2, offset=1)
        loss, terms = ref.rdm_bank_loss(x_, out.x_hat, out.logits, out.rate, R_, dist="mse")
        return loss, terms["loss"], out.x_hat

    assert gradcheck(f, (x, R, *[p[k] for k in names], *mats, *biases, *facs))


# --------------------------------------------------------------------------- training
def _train(bank, x, steps, lr=1e-2):
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        out = bank(x, seed=1, offset=step * bank.n * x.shape[0] * bank.L)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_training_reduces_loss_and_traces_rate_distortion(one_thread):
    """Adam on a fixed Gaussian X: the loss falls within a few steps, and after 200 steps
    the RDM with the larger R reconstructs better (lower distortion) and spends more rate,
    measured frozen (eval, rounded latent). ~1 s on one thread (5 ms a step)."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, generator=_g(70))
    bank = RDMBank(2, 8, 16, 8, 0, R=[0.05, 20.0])
    losses = _train(bank, x, 200)
    assert sum(losses[5:10]) < sum(losses[:5])
    assert losses[-1] < 0.5 * losses[0]
    bank.eval()
    out = bank(x)
    dist, rate = out.terms["dist"], out.terms["rate"]
    assert dist[1] < dist[0], dist
    assert rate[1] > rate[0], rate
