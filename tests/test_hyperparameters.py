# SPDX-License-Identifier: Apache-2.0
"""Hyperparameters are validated where they enter: the modules' constructors and the
reference functions, one message style (``cifd_kernels.reference._checks``):
``<name> must be ..., got <value> (<where>[, element i])``, TypeError for a wrong
type (bool included), ValueError for a bad value."""
import re

import numpy as np
import pytest
import torch

from cifd_kernels.nn import IBM, EntropyBottleneck
from cifd_kernels.nn.cifd_loss import CIFDEmbeddingLoss, CIFDLoss
from cifd_kernels.nn.rdm import RDM, RDMBank
from cifd_kernels.reference import _checks
from cifd_kernels.reference import cifd_loss as ref
from cifd_kernels.reference import rdm as ref_rdm
from helpers import seeded_randn

NAN, INF = float("nan"), float("inf")
N, D, H, L, K, B, M = 3, 4, 5, 3, 6, 2, 3


# ----------------------------------------------------------------------------- callers
def _inputs():
    return dict(sl=seeded_randn(B, K, seed=1), tl=seeded_randn(M, B, K, seed=2),
                y=torch.tensor([0, K - 1]), su=seeded_randn(B, D, seed=3), te=seeded_randn(M, B, D, seed=4))


def _cifd_loss(**kw):
    i = _inputs()
    return ref.cifd_loss(i["sl"], i["tl"], i["y"], i["su"], i["te"], **kw)


def _embedding_loss(**kw):
    i = _inputs()
    return ref.cifd_embedding_loss(i["su"], i["te"], i["su"].flip(0), **kw)


def _bank_loss(R=(1.0, 0.5, 0.0), **kw):
    x = seeded_randn(B, D, seed=5)
    return ref_rdm.rdm_bank_loss(x, seeded_randn(N, B, D, seed=6), seeded_randn(N, B, K, seed=7),
                                 seeded_randn(N, B, seed=8).abs(), R, torch.tensor([1, 2]),
                                 seeded_randn(B, K, seed=9), **kw)


def _rdm_loss(R=1.0, **kw):
    return ref_rdm.rdm_loss(seeded_randn(B, D, seed=5), seeded_randn(B, D, seed=6),
                            seeded_randn(B, K, seed=7), seeded_randn(B, seed=8).abs(), R, **kw)


def _bank_forward(**kw):
    bank = RDMBank(N, D, H, L, K)
    eb = bank.entropy_bottleneck
    p = {k: v.detach() for k, v in bank._stacked().items()}
    return ref_rdm.rdm_bank_forward(seeded_randn(B, D, seed=5), p, list(eb.matrices), list(eb.biases),
                                    list(eb.factors), **kw)


CALLERS = {
    "RDMBank": lambda **kw: RDMBank(**{"n": N, "D": D, "H": H, "L": L, "K": K, **kw}),
    "RDM": lambda **kw: RDM(**{"D": D, "H": H, "L": L, "K": K, **kw}),
    "CIFDLoss": CIFDLoss,
    "CIFDEmbeddingLoss": CIFDEmbeddingLoss,
    "cifd_loss": _cifd_loss,
    "cifd_embedding_loss": _embedding_loss,
    "rdm_bank_loss": _bank_loss,
    "rdm_loss": _rdm_loss,
    "rdm_bank_forward": _bank_forward,
    "kl_tau": lambda tau: ref.kl_tau(seeded_randn(B, K), seeded_randn(B, K, seed=1), tau),
    "info_nce": lambda temperature: ref.info_nce(seeded_randn(B, D), seeded_randn(B, D, seed=1), temperature),
    "kd_keep_flags": lambda p_drop: ref.kd_keep_flags(M, 0, 0, p_drop),
    "EntropyBottleneck": lambda **kw: EntropyBottleneck(D, **kw),
    "IBM": lambda **kw: IBM(D, **kw),
}

# ----------------------------------------------------------------------------- scalar arguments
# kind -> (bad value, exception, what the message says after "<name> must ")
_NUM = (TypeError, "be a number, got")
BAD = {
    "weight": [(-1.0, ValueError, r"be finite and >= 0, got -1\.0"), (NAN, ValueError, r"be finite and >= 0"),
               (INF, ValueError, r"be finite and >= 0"), (True, *_NUM), ("1", *_NUM), (None, *_NUM)],
    "positive": [(0.0, ValueError, r"be finite and > 0, got 0\.0"), (-1.0, ValueError, r"be finite and > 0"),
                 (NAN, ValueError, r"be finite and > 0"), (INF, ValueError, r"be finite and > 0"),
                 (True, *_NUM), ("2", *_NUM)],
    "p_drop": [(1.0, ValueError, r"be in \[0, 1\), got 1\.0"), (-0.1, ValueError, r"be in \[0, 1\)"),
               (NAN, ValueError, r"be in \[0, 1\)"), (True, *_NUM)],
    "p_closed": [(1.5, ValueError, r"be in \[0, 1\], got 1\.5"), (-0.1, ValueError, r"be in \[0, 1\]"),
                 (NAN, ValueError, r"be in \[0, 1\]"), (False, *_NUM)],
    "open_prob": [(0.0, ValueError, r"be in \(0, 1\)"), (1.0, ValueError, r"be in \(0, 1\)"), (True, *_NUM)],
    "width": [(0, ValueError, r"be a positive int, got 0"), (-2, ValueError, r"be a positive int"),
              (2.0, TypeError, r"be an int, got float"), (True, TypeError, r"be an int, got bool"),
              ("3", TypeError, r"be an int, got str")],
    # K: 0 is a head-less RDM
    "count": [(-1, ValueError, r"be an int >= 0, got -1"), (2.0, TypeError, r"be an int, got float"),
              (True, TypeError, r"be an int, got bool"), ("3", TypeError, r"be an int, got str")],
    "int": [(1.5, TypeError, r"be an int, got float"), (True, TypeError, r"be an int, got bool")],
    # a likelihood bound <= 0 switches the bound off (CompressAI's rule)
    "finite": [(NAN, ValueError, r"be finite, got nan"), (-INF, ValueError, r"be finite, got -inf"),
               (True, *_NUM), ("1", *_NUM)],
    "choice": [("nope", ValueError, r"be one of \(.*\), got 'nope'"),
               (3, TypeError, r"be one of .*, got int")],
}
_RDM_ARGS = dict(D="width", H="width", L="width", K="count", tau="positive", lam_ce="weight", lam_kl="weight",
                 init_scale="positive", tail_mass="open_prob", likelihood_bound="weight", act="choice",
                 dist="choice", ignore_index="int")
ARGS = {
    "RDMBank": dict(n="width", **_RDM_ARGS),
    "RDM": dict(R="weight", **_RDM_ARGS),
    "CIFDLoss": dict(tau="positive", p_drop="p_drop", lam_ce="weight", lam_kl="weight", w_emb="weight",
                     lam_I="weight", dist="choice", ignore_index="int"),
    "CIFDEmbeddingLoss": dict(p_drop="p_drop", w_emb="weight", lam_I="weight", lam_cl="weight",
                              temperature="positive", dist="choice"),
    "cifd_loss": dict(tau="positive", p_drop="p_closed", lam_ce="weight", lam_kl="weight", w_emb="weight",
                      lam_I="weight", dist="choice", ignore_index="int"),
    "cifd_embedding_loss": dict(p_drop="p_closed", w_emb="weight", lam_I="weight", lam_cl="weight",
                                temperature="positive", dist="choice"),
    "rdm_bank_loss": dict(tau="positive", lam_ce="weight", lam_kl="weight", dist="choice",
                          ignore_index="int"),
    "rdm_loss": dict(R="weight"),
    "rdm_bank_forward": dict(act="choice", likelihood_bound="weight"),
    "kl_tau": dict(tau="positive"),
    "info_nce": dict(temperature="positive"),
    "kd_keep_flags": dict(p_drop="p_closed"),
    "EntropyBottleneck": dict(likelihood_bound="finite"),
    "IBM": dict(likelihood_bound="finite"),
}
SCALAR_CASES = [pytest.param(where, name, v, exc, msg, id=f"{where}-{name}-{v!r}")
                for where, args in ARGS.items() for name, kind in args.items()
                for v, exc, msg in BAD[kind]]


@pytest.mark.parametrize("where,name,value,exc,msg", SCALAR_CASES)
def test_bad_scalar_raises_naming_the_argument(where, name, value, exc, msg):
    with pytest.raises(exc, match=rf"^{name} must {msg}.* \({where}\)$"):
        CALLERS[where](**{name: value})


# ----------------------------------------------------------------------------- sequence arguments
def _bad_element(name, got, where, i):
    """The message for a sequence element that is not finite and >= 0."""
    return rf"^{name} must be finite and >= 0, got {got} \({where}, element {i}\)$"


SEQ_CASES = [
    # RDMBank: R, one per RDM
    ("RDMBank", "R", (10.0, -1.0, 0.3), ValueError, _bad_element("R", r"-1\.0", "RDMBank", 1)),
    ("RDMBank", "R", (1.0, NAN, 0.3), ValueError, _bad_element("R", "nan", "RDMBank", 1)),
    ("RDMBank", "R", [INF, 1.0, 1.0], ValueError, _bad_element("R", "inf", "RDMBank", 0)),
    ("RDMBank", "R", (1.0, "a", 0.3), TypeError, r"^R must be a number, got str \(RDMBank, element 1\)$"),
    ("RDMBank", "R", (1.0, 1.0, True), TypeError, r"^R must be a number, got bool \(RDMBank, element 2\)$"),
    ("RDMBank", "R", (1.0, 2.0), ValueError, r"^len\(R\) = 2 but n = 3 \(RDMBank\)$"),
    ("RDMBank", "R", 1.0, TypeError, r"^R must be a sequence of numbers, got float \(RDMBank\)$"),
    ("RDMBank", "R", "abc", TypeError, r"^R must be a sequence"),
    ("RDM", "R", [1.0], TypeError, r"^R must be a number, got list \(RDM\)$"),
    ("RDMBank", "filters", (3, 0, 3), ValueError,
     r"^filters must be a positive int, got 0 \(RDMBank, element 1\)$"),
    ("RDM", "filters", (3, 2.5), TypeError, r"^filters must be an int, got float \(RDM, element 1\)$"),
    ("RDM", "filters", 3, TypeError, r"^filters must be a sequence of ints, got int \(RDM\)$"),
    ("rdm_bank_loss", "R", [1.0, -1.0, 0.3], ValueError, _bad_element("R", r"-1\.0", "rdm_bank_loss", 1)),
    ("rdm_bank_loss", "R", [1.0, 1.0], ValueError, r"^len\(R\) = 2 but N = 3 \(rdm_bank_loss\)$"),
    ("rdm_bank_loss", "R", [1.0, None, 1.0], TypeError, r"^R must be a number, got NoneType"),
    ("rdm_bank_loss", "R", torch.ones(2), ValueError, r"^R must have shape \[N\] = \[3\]"),
    # lam, one per target (teacher first)
    ("CIFDLoss", "lam", (1.0, -0.5, 1.0), ValueError, _bad_element("lam", r"-0\.5", "CIFDLoss", 1)),
    ("CIFDLoss", "lam", [1.0, 1.0, NAN], ValueError, _bad_element("lam", "nan", "CIFDLoss", 2)),
    ("CIFDLoss", "lam", [True, 1.0], TypeError, r"^lam must be a number, got bool \(CIFDLoss, element 0\)$"),
    ("CIFDLoss", "lam", [], ValueError, r"^lam must hold at least one value"),
    ("CIFDLoss", "lam", 1.0, TypeError, r"^lam must be a sequence of numbers, got float \(CIFDLoss\)$"),
    ("CIFDEmbeddingLoss", "lam", (1.0, -INF), ValueError,
     _bad_element("lam", "-inf", "CIFDEmbeddingLoss", 1)),
    ("cifd_loss", "lam", [1.0, 1.0], ValueError, r"^lam must have M = 3 weights .*, got 2 \(cifd_loss\)$"),
    ("cifd_loss", "lam", [1.0, -1.0, 1.0], ValueError, _bad_element("lam", r"-1\.0", "cifd_loss", 1)),
    ("cifd_loss", "lam", 2.0, TypeError, r"^lam must be a sequence of numbers, a tensor or None"),
    ("cifd_loss", "lam", torch.ones(2), ValueError, r"^lam must have shape \[M\] = \[3\]"),
    ("cifd_embedding_loss", "lam", [1.0, 1.0, INF], ValueError,
     _bad_element("lam", "inf", "cifd_embedding_loss", 2)),
    ("cifd_embedding_loss", "lam", [1.0], ValueError, r"^lam must have M = 3 weights"),
]


@pytest.mark.parametrize("where,name,value,exc,match", SEQ_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(SEQ_CASES)])
def test_bad_sequence_raises_naming_argument_and_element(where, name, value, exc, match):
    with pytest.raises(exc, match=match):
        CALLERS[where](**{name: value})


@pytest.mark.parametrize("cls", [CIFDLoss, CIFDEmbeddingLoss])
def test_module_lam_length_is_checked_against_the_targets(cls):
    i = _inputs()
    mod = cls(lam=[1.0, 1.0], backend="reference")
    args = (i["sl"], i["tl"], i["y"]) if cls is CIFDLoss else (i["su"], i["te"], i["su"])
    with pytest.raises(ValueError, match=r"^lam must have M = 3 weights"):
        mod(*args, seed=0)


# ----------------------------------------------------------------------------- good edge values
def test_R_zero_is_a_rate_only_rdm():
    """R >= 0: R = 0 is accepted and weighs the distortion out of the loss."""
    assert RDM(D, H, L, K, R=0.0).R == (0.0,)
    bank = RDMBank(N, D, H, L, K, R=[0, 1, np.float32(2.5)], backend="reference")
    assert bank.R == (0.0, 1.0, 2.5) and all(type(r) is float for r in bank.R)
    x, t = seeded_randn(B, D, dtype=torch.float32), seeded_randn(B, K, dtype=torch.float32)
    y = torch.tensor([0, 1])
    out = bank(x, t, y, seed=3)
    tm = out.terms
    torch.testing.assert_close(tm["loss"][0], tm["rate"][0] + tm["ce"][0] + tm["kl"][0])
    assert torch.isfinite(out.loss)
    loss, terms = _bank_loss(R=(0.0, 0.0, 0.0))
    torch.testing.assert_close(terms["loss"], terms["rate"] + terms["ce"] + terms["kl"])
    _rdm_loss(R=0)


def test_edge_values_are_accepted_and_stored_as_python_numbers():
    m = CIFDLoss(lam=[0, 0.5, np.float64(1.0)], tau=np.float32(1e-3), p_drop=0, lam_ce=0, lam_kl=0, w_emb=0,
                 lam_I=0, ignore_index=np.int64(-1))
    assert m.lam == (0.0, 0.5, 1.0) and m.p_drop == 0.0 and type(m.tau) is float
    assert type(m.ignore_index) is int and type(m.w_emb) is float
    e = CIFDEmbeddingLoss(lam=(1, 0), p_drop=0.0, w_emb=0.0, lam_I=0.0, lam_cl=0.0, temperature=1)
    assert e.temperature == 1.0 and e.lam == (1.0, 0.0)
    r = RDMBank(np.int64(2), np.int64(D), H, L, K, R=(1, 0), lam_ce=0, lam_kl=0, likelihood_bound=0,
                filters=(2,), tail_mass=0.5)
    assert (r.n, r.D, r.lam_ce, r.entropy_bottleneck.filters) == (2, D, 0.0, (2,))


def test_functionals_accept_the_edges():
    _, t0 = _cifd_loss(p_drop=0.0, lam=[0.0, 0.0, 0.0], lam_ce=0.0, lam_kl=0.0, w_emb=0.0, lam_I=0.0)
    assert t0["keep"].all() and t0["loss"] == 0
    # p_drop = 1 is a well-defined call for the functionals (every target dropped); the
    # modules, which hold it as a training setting, require [0, 1).
    _, t1 = _cifd_loss(p_drop=1.0, seed=3)
    assert not t1["keep"].any()
    assert not ref.kd_keep_flags(M, 0, 0, 1.0).any()
    _embedding_loss(p_drop=0.0, w_emb=0.0, lam_I=0.0, lam_cl=0.0)
    _bank_loss(lam_ce=0.0, lam_kl=0.0, tau=0.5)
    _bank_forward(likelihood_bound=0.0)


def test_tensor_weights_are_checked_for_shape_only():
    """A tensor lam or R is not value-checked (that would need a host read): the
    modules hold validated Python numbers and pass those."""
    _, terms = _cifd_loss(lam=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(terms["loss"])
    _bank_loss(R=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- the helper itself
def test_checks_message_style_and_general_use():
    with pytest.raises(ValueError) as e:
        RDMBank(3, D, H, L, K, R=(10.0, -1.0, 0.3))
    assert str(e.value) == "R must be finite and >= 0, got -1.0 (RDMBank, element 1)"
    with pytest.raises(ValueError, match=re.escape("s must be finite and > 0, got 0.0 (IBM)")):
        _checks.check_positive("s", 0.0, "IBM")
    with pytest.raises(ValueError, match=re.escape("rho must be in [0, 1], got 1.5")):
        _checks.check_prob("rho", 1.5, hi_closed=True)
    with pytest.raises(ValueError, match=re.escape("x must be in (0, 1], got 0.0 (f)")):
        _checks.check_prob("x", 0.0, "f", lo_closed=False, hi_closed=True)
    with pytest.raises(ValueError, match=re.escape("k must be an int >= 0, got -1")):
        _checks.check_int("k", -1, lo=0)
    with pytest.raises(ValueError, match=re.escape("v must be finite, got nan (g, element 2)")):
        _checks.check_sequence("v", [1, -2, NAN], _checks.check_finite, "g")
    assert _checks.check_finite("v", -2) == -2.0
    w = _checks.check_sequence("w", (1, np.float32(0.5)), _checks.check_finite_nonneg, length=2)
    assert w == (1.0, 0.5) and all(type(v) is float for v in w)
    with pytest.raises(ValueError, match=re.escape("len(w) = 1 but M = 2 (h)")):
        _checks.check_sequence("w", [1.0], _checks.check_finite_nonneg, "h", length=2, what="M")
    assert _checks.check_choice("c", "a", ("a", "b")) == "a"
    assert _checks.check_prob("p", 0.0) == 0.0 and _checks.check_int("i", np.int32(4)) == 4
