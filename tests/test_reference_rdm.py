# SPDX-License-Identifier: Apache-2.0
"""Reference RDM / RDM bank (stage 1) and the RDM / RDMBank modules."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from cifd_kernels.backend import BackendUnavailableError
from cifd_kernels.nn.rdm import RDM, RDMBank
from cifd_kernels.reference import entropy_bottleneck as eb_ref
from cifd_kernels.reference import rdm as ref
from cifd_kernels.reference.cifd_loss import distortion, kl_tau
from cifd_kernels.reference.philox import philox_noise
from helpers import one_thread, seeded_randn  # noqa: F401  (one_thread: fixture)

F64 = torch.float64
N, B, D, H, L, K = 3, 4, 5, 6, 3, 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _g(seed):
    return torch.Generator().manual_seed(seed)


_randn = seeded_randn


def _labels(batch=B, k=K, seed=0):
    return torch.randint(0, k, (batch,), generator=_g(seed))


def _bank_params(n=N, d=D, h=H, l=L, k=K, seed=0, grad=True, filters=(3, 3, 3, 3)):
    """Stacked float64 parameters and a perturbed entropy model over n*l channels."""
    p = ref.init_params(n, d, h, l, k, generator=_g(seed), dtype=F64)
    e = eb_ref.init_params(n * l, filters, generator=_g(seed + 1))
    g = _g(seed + 2)
    lists = [[(t.double() + 0.3 * torch.randn(t.shape, generator=g, dtype=F64)) for t in e[key]]
             for key in ("matrices", "biases", "factors")]
    q = e["quantiles"].double() + 0.2 * torch.randn(e["quantiles"].shape, generator=g, dtype=F64)
    for t in list(p.values()) + [t for ts in lists for t in ts] + [q]:
        t.requires_grad_(grad)
    return p, lists, q


def _random_backward(outputs, seed=99):
    """Backward with random grad_outputs (never a bare .sum())."""
    outs = [o for o in outputs if o.requires_grad]
    grads = [torch.randn(o.shape, generator=_g(seed + i), dtype=o.dtype) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, grads)


# --------------------------------------------------------------------------- layout and noise
def test_param_layout():
    p = ref.init_params(N, D, H, L, K)
    expect = {"enc1.weight": (N, H, D), "enc1.bias": (N, H), "enc2.weight": (N, L, H), "enc2.bias": (N, L),
              "dec1.weight": (N, H, L), "dec1.bias": (N, H), "dec2.weight": (N, D, H), "dec2.bias": (N, D),
              "head.weight": (N, K, D), "head.bias": (N, K)}
    assert {k: tuple(v.shape) for k, v in p.items()} == expect
    assert ref.bank_sizes(p) == (N, D, H, L, K)
    singles = ref.unstack_params(p)
    assert tuple(singles[1]["enc1.weight"].shape) == (H, D)
    restacked = ref.stack_params(singles)
    assert all(torch.equal(restacked[k], p[k]) for k in p)


def test_bank_noise_layout_is_n_b_l():
    p, (mats, biases, facs), _ = _bank_params(grad=False)
    x = _randn(B, D, seed=5)
    out = ref.rdm_bank_forward(x, p, mats, biases, facs, mode="noise", seed=7, offset=13)
    u = out.z_hat - out.z
    # counter offset + n*B*L + b*L + l
    torch.testing.assert_close(u, philox_noise((N, B, L), 7, 13).double(), rtol=0, atol=1e-15)
    for n in range(N):
        torch.testing.assert_close(u[n], philox_noise((B, L), 7, 13 + n * B * L).double(), rtol=0, atol=1e-15)


def test_bank_forward_matches_layer_by_layer_math():
    p, (mats, biases, facs), q = _bank_params(grad=False)
    x = _randn(B, D, seed=5)
    out = ref.rdm_bank_forward(x, p, mats, biases, facs, mode="noise", seed=3, act="gelu")
    for n in range(N):
        lin = lambda t, name: F.linear(t, p[f"{name}.weight"][n], p[f"{name}.bias"][n])  # noqa: E731
        z = lin(F.gelu(lin(x, "enc1")), "enc2")
        torch.testing.assert_close(out.z[n], z)
        xh = lin(F.gelu(lin(out.z_hat[n], "dec1")), "dec2")
        torch.testing.assert_close(out.x_hat[n], xh)
        torch.testing.assert_close(out.logits[n], lin(xh, "head"))
    # the bank's density: channel n*L + l of one entropy model over N*L channels
    lik = eb_ref.likelihood(out.z_hat.permute(1, 0, 2).reshape(B, N * L), mats, biases, facs)
    torch.testing.assert_close(out.likelihoods, lik.reshape(B, N, L).permute(1, 0, 2))
    torch.testing.assert_close(out.rate, -torch.log(out.likelihoods).sum(-1))


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_rdm_forward_gradcheck_noise_mode(act):
    d, h, l, k, b = 3, 4, 2, 3, 2
    p, (mats, biases, facs), _ = _bank_params(1, d, h, l, k, filters=(2, 2))
    single = {name: t.detach()[0].clone().requires_grad_() for name, t in p.items()}
    x = _randn(b, d, seed=4, grad=True)
    names = list(single)

    def f(x_, *flat):
        ps = dict(zip(names, flat[:len(names)]))
        rest = list(flat[len(names):])
        m_ = rest[:len(mats)]
        b_ = rest[len(mats):2 * len(mats)]
        f_ = rest[2 * len(mats):]
        out = ref.rdm_forward(x_, ps, m_, b_, f_, act=act, mode="noise", seed=11, offset=5)
        return out.x_hat, out.logits, out.rate

    assert gradcheck(f, (x, *[single[n] for n in names], *mats, *biases, *facs))


def test_bank_loss_gradcheck():
    n, d, h, l, k, b = 2, 3, 3, 2, 3, 3
    p, (mats, biases, facs), _ = _bank_params(n, d, h, l, k, filters=(2, 2))  # small: gradcheck cost
    x = _randn(b, d, seed=4, grad=True)
    t = _randn(b, k, seed=6, scale=2, grad=True)
    y = _labels(b, k)
    y[1] = -100
    R = torch.tensor([1.5, 0.7], dtype=F64, requires_grad=True)
    names = list(p)

    def f(x_, t_, R_, *flat):
        ps = dict(zip(names, flat[:len(names)]))
        rest = list(flat[len(names):])
        m_, b_, f_ = rest[:len(mats)], rest[len(mats):2 * len(mats)], rest[2 * len(mats):]
        out = ref.rdm_bank_forward(x_, ps, m_, b_, f_, mode="noise", seed=2, offset=1)
        loss, terms = ref.rdm_bank_loss(x_, out.x_hat, out.logits, out.rate, R_, y, t_, dist="smooth_l1",
                                        lam_ce=0.5, lam_kl=2.0, tau=2.0)
        return loss, terms["loss"]

    # smooth-L1's switch point: keep |x - x_hat| away from 1 for this seed
    with torch.no_grad():
        out = ref.rdm_bank_forward(x, p, mats, biases, facs, mode="noise", seed=2, offset=1)
        assert ((x - out.x_hat).abs() - 1).abs().min() > 1e-3
    assert gradcheck(f, (x, t, R, *[p[nm] for nm in names], *mats, *biases, *facs))


# --------------------------------------------------------------------------- stage-1 loss
def test_bank_loss_terms_compose():
    p, (mats, biases, facs), _ = _bank_params(grad=False)
    x, t, y = _randn(B, D, seed=4), _randn(B, K, seed=6, scale=2), _labels()
    out = ref.rdm_bank_forward(x, p, mats, biases, facs, seed=1)
    R = [1.0, 0.8, 0.6]
    loss, terms = ref.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, R, y, t, lam_ce=0.3, lam_kl=0.9, tau=3.0)
    for n in range(N):
        dist_n = distortion(x, out.x_hat[n]).mean()
        kl_n = kl_tau(t, out.logits[n], 3.0).mean()
        ce_n = F.cross_entropy(out.logits[n], y)
        torch.testing.assert_close(terms["dist"][n], dist_n)
        torch.testing.assert_close(terms["kl"][n], kl_n)
        torch.testing.assert_close(terms["ce"][n], ce_n)
        torch.testing.assert_close(terms["rate"][n], out.rate[n].mean())
        torch.testing.assert_close(terms["loss"][n], R[n] * dist_n + out.rate[n].mean() + 0.3 * ce_n + 0.9 * kl_n)
    torch.testing.assert_close(loss, terms["loss"].sum())
    # labels / teacher logits left out: those terms are 0
    _, t2 = ref.rdm_bank_loss(x, out.x_hat, out.logits, out.rate, R)
    assert (t2["ce"] == 0).all() and (t2["kl"] == 0).all()
    torch.testing.assert_close(t2["loss"], torch.tensor(R, dtype=F64) * terms["dist"] + terms["rate"])


# --------------------------------------------------------------------------- modules: bank == singles
def _rdms(dtype=F64):
    torch.manual_seed(0)
    rdms = [RDM(D, H, L, K, R=r, act="gelu", dist="smooth_l1", lam_kl=0.5, tau=2.0) for r in (1.0, 0.8, 0.6)]
    g = _g(3)
    with torch.no_grad():  # move the entropy models away from their (identical) init
        for r in rdms:
            for prm in r.entropy_bottleneck.parameters():
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    return [r.to(dtype) for r in rdms]


def test_bank_from_rdms_equals_rdms_one_by_one():
    rdms = _rdms()
    bank = RDMBank.from_rdms(rdms)
    assert bank.R == (1.0, 0.8, 0.6)
    x, t, y = _randn(B, D, seed=4), _randn(B, K, seed=6, scale=2), _labels()
    seed, offset = 21, 1000
    out = bank(x, t, y, seed=seed, offset=offset)
    gx, gl, gr = _randn(N, B, D, seed=7), _randn(N, B, K, seed=8), _randn(N, B, seed=9)
    gloss = _randn(N, seed=10)
    torch.autograd.backward([out.x_hat, out.logits, out.rate, out.terms["loss"]], [gx, gl, gr, gloss])
    for n, r in enumerate(rdms):
        o = r(x, t, y, seed=seed, offset=offset + n * B * L)  # the bank's counter layout
        torch.testing.assert_close(out.x_hat[n], o.x_hat)
        torch.testing.assert_close(out.logits[n], o.logits)
        torch.testing.assert_close(out.rate[n], o.rate)
        torch.testing.assert_close(out.likelihoods[n], o.likelihoods)
        for key in ("dist", "rate", "ce", "kl", "loss"):
            torch.testing.assert_close(out.terms[key][n], o.terms[key])
        torch.autograd.backward([o.x_hat, o.logits, o.rate, o.loss], [gx[n], gl[n], gr[n], gloss[n]])
        for layer in ("enc1", "enc2", "dec1", "dec2", "head"):
            for pn in ("weight", "bias"):
                torch.testing.assert_close(getattr(getattr(bank, layer), pn).grad[n],
                                           getattr(getattr(r, layer), pn).grad)
        sl = slice(n * L, (n + 1) * L)
        for name, prm in r.entropy_bottleneck.named_parameters():
            bank_grad = dict(bank.entropy_bottleneck.named_parameters())[name].grad
            if prm.grad is None:  # quantiles: no gradient from the forward in training
                assert bank_grad is None or (bank_grad[sl] == 0).all()
            else:
                torch.testing.assert_close(bank_grad[sl], prm.grad)
    torch.testing.assert_close(out.loss, sum(r(x, t, y, seed=seed, offset=offset + n * B * L).loss
                                             for n, r in enumerate(rdms)))
    # a different offset draws different noise: the equality above is not vacuous
    o_wrong = rdms[1](x, t, y, seed=seed, offset=offset)
    assert not torch.allclose(o_wrong.x_hat, out.x_hat[1])


def _fake_coder_tables(r, width, seed):
    """Coder buffers as update() shapes them ([L] offsets and lengths, [L, width] CDF rows,
    width = max length), filled with arbitrary ints: from_rdms/split only move them."""
    g = _g(seed)
    lengths = torch.randint(3, width + 1, (L,), generator=g, dtype=torch.int32)
    lengths[0] = width
    cdf = torch.randint(0, 1 << 16, (L, width), generator=g, dtype=torch.int32)
    sd = dict(r.state_dict())
    sd.update({"entropy_bottleneck._offset": -torch.randint(0, 9, (L,), generator=g, dtype=torch.int32),
               "entropy_bottleneck._quantized_cdf": cdf, "entropy_bottleneck._cdf_length": lengths})
    r.load_state_dict(sd)


def test_split_inverts_from_rdms():
    rdms = _rdms(torch.float32)
    _fake_coder_tables(rdms[1], 9, 1)  # coder tables of one RDM only: not carried
    bank = RDMBank.from_rdms(rdms)
    assert bank.entropy_bottleneck._offset.numel() == 0
    back = bank.split()
    for r, s in zip(rdms, back):
        assert s.R == r.R and s._same_hparams(r)
        sd_r, sd_s = r.state_dict(), s.state_dict()
        assert sd_r.keys() == sd_s.keys()
        for key in sd_r:
            if key.split(".")[-1] in ("_offset", "_quantized_cdf", "_cdf_length"):
                continue
            torch.testing.assert_close(sd_s[key], sd_r[key], rtol=0, atol=0, msg=key)
    # with every RDM's coder tables filled (rows of different widths) they concatenate,
    # zero-padded, and split back exactly
    for i, (r, width) in enumerate(zip(rdms, (7, 12, 5))):
        _fake_coder_tables(r, width, 10 + i)
    bank = RDMBank.from_rdms(rdms)
    assert tuple(bank.entropy_bottleneck._quantized_cdf.shape) == (N * L, 12)
    back = bank.split()
    for r, s in zip(rdms, back):
        for key, v in r.state_dict().items():
            torch.testing.assert_close(s.state_dict()[key], v, rtol=0, atol=0, msg=key)
    # and bank -> split -> bank is the identity on the state dict
    bank2 = RDMBank.from_rdms(back)
    for key, v in bank.state_dict().items():
        torch.testing.assert_close(bank2.state_dict()[key], v, rtol=0, atol=0, msg=key)


def test_from_rdms_rejects_mismatched_rdms():
    a, b = RDM(D, H, L, K), RDM(D, H, L + 1, K)
    with pytest.raises(ValueError, match=r"rdms\[1\] has \(D, H, L, K\)"):
        RDMBank.from_rdms([a, b])
    with pytest.raises(ValueError, match="hyperparameters"):
        RDMBank.from_rdms([a, RDM(D, H, L, K, act="gelu")])
    with pytest.raises(ValueError, match="at least one"):
        RDMBank.from_rdms([])


def test_bank_state_dict_layout():
    bank = RDMBank(N, D, H, L, K, R=[1.0, 0.5, 0.2])
    sd = bank.state_dict()
    assert tuple(sd["enc1.weight"].shape) == (N, H, D) and tuple(sd["head.bias"].shape) == (N, K)
    assert tuple(sd["entropy_bottleneck.quantiles"].shape) == (N * L, 1, 3)
    assert tuple(sd["entropy_bottleneck.matrices.0"].shape) == (N * L, 3, 1)
    assert not any(k.startswith("R") for k in sd)  # a hyperparameter, not state
    rdm_sd = RDM(D, H, L, K).state_dict()
    assert tuple(rdm_sd["enc1.weight"].shape) == (H, D)
    assert {k.split(".")[0] for k in rdm_sd} == {"enc1", "enc2", "dec1", "dec2", "head", "entropy_bottleneck"}


# --------------------------------------------------------------------------- eval mode
def test_eval_mode_rounds_and_is_deterministic():
    bank = RDMBank.from_rdms(_rdms(torch.float32)).eval()
    x, t, y = _randn(B, D, seed=4, dtype=torch.float32), _randn(B, K, seed=6, dtype=torch.float32), _labels()
    a = bank(x, t, y, seed=1)
    b = bank(x, t, y, seed=2)
    for u, v in zip(a[:4], b[:4]):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert not a.x_hat.requires_grad and not a.loss.requires_grad
    # the same as the reference in "dequantize" mode: latent rounded around the medians
    eb = bank.entropy_bottleneck
    p = {k: v.detach() for k, v in bank.state_dict().items() if k in ref.PARAM_NAMES}
    med = eb.medians().detach()
    ref_out = ref.rdm_bank_forward(x, p, [m.detach() for m in eb.matrices], [m.detach() for m in eb.biases],
                                   [m.detach() for m in eb.factors], med, act="gelu", mode="dequantize")
    torch.testing.assert_close(a.x_hat, ref_out.x_hat, rtol=0, atol=0)
    offs = ref_out.z_hat - med.reshape(N, 1, L)
    torch.testing.assert_close(offs, torch.round(offs), rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_out.z_hat, torch.round(ref_out.z - med.reshape(N, 1, L)) + med.reshape(N, 1, L))
    # training mode differs (noise), and depends on the seed
    bank.train()
    c = bank(x, t, y, seed=1)
    assert not torch.allclose(c.x_hat, a.x_hat)
    assert not torch.allclose(c.x_hat, bank(x, t, y, seed=2).x_hat)


def test_training_seed_none_follows_torch_manual_seed():
    bank = RDMBank(2, D, H, L, K)
    x = _randn(B, D, seed=4, dtype=torch.float32)
    torch.manual_seed(5)
    a = bank(x)
    torch.manual_seed(5)
    b = bank(x)
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=0, atol=0)


def test_half_input_runs_in_fp32():
    bank = RDMBank(2, D, H, L, K)
    x = _randn(B, D, seed=4, dtype=torch.bfloat16)
    out = bank(x, seed=3)
    assert out.x_hat.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.x_hat, bank(x.float(), seed=3).x_hat, rtol=0, atol=0)


# --------------------------------------------------------------------------- backends and errors
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_backends_that_run(backend):
    out = RDMBank(2, D, H, L, K, backend=backend)(_randn(B, D, dtype=torch.float32), seed=0)
    assert torch.isfinite(out.loss)


def test_unavailable_backend_raises():
    bank = RDMBank(2, D, H, L, K, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="rdm_bank"):
        bank(_randn(B, D, dtype=torch.float32), seed=0)


def _bad_calls():
    bank = RDMBank(N, D, H, L, K)
    x, t, y = _randn(B, D, dtype=torch.float32), _randn(B, K, dtype=torch.float32), _labels()
    p, (mats, biases, facs), _ = _bank_params(grad=False)
    xd = x.double()
    return [
        ("R len", lambda: RDMBank(N, D, H, L, K, R=[1.0, 2.0]), ValueError, "len\\(R\\) = 2 but n = 3"),
        ("R len fn", lambda: ref.rdm_bank_loss(xd, xd.expand(N, B, D), torch.zeros(N, B, K, dtype=F64),
                                               torch.zeros(N, B, dtype=F64), [1.0]), ValueError, "len\\(R\\) = 1"),
        ("R type", lambda: RDM(D, H, L, K, R=[1.0]), TypeError, "R must be a number"),
        ("act", lambda: RDMBank(N, D, H, L, K, act="tanh"), ValueError, "act must be one of"),
        ("dist", lambda: RDMBank(N, D, H, L, K, dist="l1"), ValueError, "dist must be one of"),
        ("tau", lambda: RDMBank(N, D, H, L, K, tau=0.0), ValueError, "tau must be"),
        ("n", lambda: RDMBank(0, D, H, L, K), ValueError, "n must be a positive int"),
        ("x rank", lambda: bank(x[0]), ValueError, "x must have 2 dims"),
        ("x D", lambda: bank(x[:, :2]), ValueError, "x: the embedding dim D"),
        ("x dtype", lambda: bank(y.reshape(-1, 1).expand(B, D)), TypeError, "x must be a floating"),
        ("labels dtype", lambda: bank(x, t, t[:, 0]), TypeError, "labels must be an integer"),
        ("labels B", lambda: bank(x, t, y[:2]), ValueError, "labels: the batch size B"),
        ("teacher K", lambda: bank(x, t[:, :3]), ValueError, "teacher_logits: the class count K"),
        ("teacher B", lambda: bank(x, t[:2]), ValueError, "teacher_logits: the batch size B"),
        ("device", lambda: bank(x, torch.empty(B, K, device="meta")), ValueError, "teacher_logits is on meta"),
        ("x device", lambda: bank(torch.empty(B, D, device="meta")), ValueError, "on cpu but x is on meta"),
        ("empty", lambda: bank(x[:0], seed=0), ValueError, "empty batch"),
        ("mode", lambda: ref.rdm_bank_forward(xd, p, mats, biases, facs, mode="round"), ValueError, "mode must"),
        ("medians", lambda: ref.rdm_bank_forward(xd, p, mats, biases, facs, mode="dequantize"), ValueError,
         "needs medians"),
        ("eb channels", lambda: ref.rdm_bank_forward(xd, p, [m[:2] for m in mats], biases, facs), ValueError,
         "channel count N\\*L"),
        ("param shape", lambda: ref.rdm_bank_forward(xd, {**p, "dec1.bias": p["dec1.bias"][:, :2]}, mats, biases,
                                                     facs), ValueError, "params\\['dec1.bias'\\] must have shape"),
        ("param missing", lambda: ref.rdm_bank_forward(xd, {k: v for k, v in p.items() if k != "head.bias"},
                                                       mats, biases, facs), KeyError, "head.bias"),
        ("seed", lambda: bank(x, seed=-1), ValueError, "seed must be"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_clear_errors(case):
    name, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_single_rdm_module_shapes():
    r = RDM(D, H, L, K, R=2.0)
    out = r(_randn(B, D, dtype=torch.float32), _randn(B, K, dtype=torch.float32), _labels(), seed=0)
    assert out.x_hat.shape == (B, D) and out.logits.shape == (B, K) and out.rate.shape == (B,)
    assert out.likelihoods.shape == (B, L) and out.loss.dim() == 0
    assert all(v.dim() == 0 for v in out.terms.values())
    assert torch.isfinite(r.aux_loss())


def test_bank_on_device_with_noncontiguous_input(device):
    """Same outputs, loss and gradients on every device (same Philox bits) and for a strided x."""
    bank = RDMBank.from_rdms(_rdms())
    x, t, y = _randn(B, D, seed=4), _randn(B, K, seed=6, scale=2), _labels()

    def run(module, x_, t_, y_):
        module.zero_grad()
        out = module(x_, t_, y_, seed=8, offset=77)
        _random_backward([out.x_hat, out.logits, out.rate, out.loss])
        return out, {k: v.grad.detach().cpu() for k, v in module.named_parameters() if v.grad is not None}

    out_ref, grads_ref = run(bank, x, t, y)
    moved = RDMBank.from_rdms(_rdms()).to(device)
    x_strided = torch.stack([x, -x], -1)[..., 0].to(device)
    assert not x_strided.is_contiguous()
    out, grads = run(moved, x_strided, t.to(device), y.to(device))
    for a, b in zip(out[:5], out_ref[:5]):
        torch.testing.assert_close(a.cpu(), b)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], msg=k)
