# SPDX-License-Identifier: Apache-2.0
"""The modules compiled whole, as users compile them: ``torch.compile(m,
fullgraph=True)`` in training mode, called *without* a seed.

A module called without a seed draws one with ``reference.philox.draw_seed``: eagerly
a Python int, while tracing the 0-dim int64 CPU tensor itself, drawn in the graph
(no ``.item()``: no graph break, no data-dependent guard). The ops read it where
their kernels launch (on the host: no device sync); the reference draws its noise
from it with torch ops. Both take the same value from torch's CPU generator, so
under ``aot_eager`` a compiled step equals the eager step after the same
``torch.manual_seed``, bit for bit, every step, with one graph and no recompile.
Also: the seed tensor's own argument rules, and that eager calls with a seed tensor
equal those with its int."""
import pytest
import torch

from cifd_kernels import backend as _backend
from cifd_kernels.nn import CIFDLoss, IBM, EntropyBottleneck
from cifd_kernels.nn.rdm import RDM, RDMBank
from cifd_kernels.ops import entropy_bottleneck, philox as ops_philox
from cifd_kernels.reference import philox as ref_philox
from helpers import backend_or_skip, require_gpu_or_skip

BACKENDS = ["reference", "cpu", "triton"]


def _skip_unless(be):
    if be == "reference":
        return
    backend_or_skip(be, "cpu")
    if be not in _backend.implemented("entropy_bottleneck"):
        pytest.skip(f"{be} entropy_bottleneck kernels not registered in this build")


def _compiled_steps_equal_eager(step, params, steps=3):
    """``step()`` eagerly and compiled (fullgraph, aot_eager) after the same
    ``torch.manual_seed``: outputs and gradients to ``params`` bit for bit, each step;
    one graph for all steps (no recompile). The steps draw different noise."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    firsts = []
    for k in range(steps):
        runs = []
        for fn in (step, compiled):
            torch.manual_seed(100 + k)
            outs = fn()
            loss = sum(o.float().sum() for o in outs if o.requires_grad)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            runs.append(([o.detach() for o in outs], grads))
        (oa, ga), (ob, gb) = runs
        for a, b in zip(oa, ob):
            assert torch.equal(a, b)
        for a, b in zip(ga, gb):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)
        firsts.append(oa[0])
    assert not torch.equal(firsts[0], firsts[1])  # a fresh seed each step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("be", BACKENDS)
def test_entropy_bottleneck_and_ibm_compile_without_a_seed(be):
    _skip_unless(be)
    torch.manual_seed(0)
    m = EntropyBottleneck(6, backend=be)
    ibm = IBM(6, rho=0.25, s=0.5, backend=be)
    y = torch.randn(5, 6, requires_grad=True)

    def step():
        y_hat, lik = m(y)
        w_hat, rate = ibm(y_hat)
        return w_hat, m.rate(lik) + rate

    _compiled_steps_equal_eager(step, [y] + list(m.parameters()) + list(ibm.parameters()))


@pytest.mark.parametrize("be", BACKENDS)
def test_rdm_bank_compiles_without_a_seed(be):
    _skip_unless(be)
    torch.manual_seed(0)
    bank = RDMBank.from_rdms([RDM(8, 9, 4, 7, R=r, act="gelu") for r in (1.0, 0.5)])
    bank.backend = be
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g)
    t = torch.randn(6, 7, generator=g)
    labels = torch.randint(0, 7, (6,), generator=g)

    def step():
        out = bank(x, t, labels)
        return out.x_hat, out.loss, out.rate, out.likelihoods

    _compiled_steps_equal_eager(step, [p for p in bank.parameters() if p.requires_grad])


@pytest.mark.parametrize("be", ["reference", "cpu", "triton"])
def test_cifd_loss_compiles_without_a_seed(be):
    """KD-dropout's keep flags drawn from a seed drawn in the graph."""
    if be != "reference":
        backend_or_skip(be, "cpu")
        if be not in _backend.implemented("cifd_loss"):
            pytest.skip(f"{be} cifd_loss kernels not registered in this build")
    loss_fn = CIFDLoss(lam=[1.0, 0.5, 0.5], p_drop=0.5, backend=be)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(7, 5, generator=g, requires_grad=True)
    tl = torch.randn(3, 7, 5, generator=g)
    labels = torch.randint(0, 5, (7,), generator=g)
    u = torch.randn(7, 4, generator=g, requires_grad=True)
    x = torch.randn(3, 7, 4, generator=g)

    def step():
        return loss_fn(z, tl, labels, u, x)[0]

    # the loss is a scalar: the "fresh seed each step" check looks at its value
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    losses = []
    for k in range(4):
        runs = []
        for fn in (step, compiled):
            torch.manual_seed(200 + k)
            loss = fn()
            runs.append((loss.detach(), torch.autograd.grad(loss, [z, u])))
        (la, ga), (lb, gb) = runs
        assert torch.equal(la, lb)
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
        losses.append(la)
    assert len({float(v) for v in losses}) > 1  # the keep flags change with the drawn seed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_modules_compile_without_a_seed_on_gpu(be):
    """On a GPU: under aot_eager the compiled step equals eager to the bit (as on the
    CPU); under Inductor (the default backend) it compiles to one graph, with fresh
    noise each step (Inductor lowers the CPU ``randint`` with its own generator, so its
    seeds are not eager's). ``deterministic=True``: the bits of the parameter gradients
    are only reproducible without the CUDA backward's float atomics (the default)."""
    require_gpu_or_skip()
    backend_or_skip(be, "cuda")
    torch.manual_seed(0)
    m = EntropyBottleneck(6, backend=be, deterministic=True).cuda()
    ibm = IBM(6, rho=0.25, s=0.5, backend=be, deterministic=True).cuda()
    y = torch.randn(65, 6, device="cuda", requires_grad=True)

    def step():
        y_hat, lik = m(y)
        w_hat, rate = ibm(y_hat)
        return w_hat, m.rate(lik) + rate

    params = [y] + list(m.parameters()) + list(ibm.parameters())
    _compiled_steps_equal_eager(step, params)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for _ in range(3):
        w_hat, rate = compiled()
        torch.autograd.grad(rate.sum(), params, allow_unused=True)
        assert torch.isfinite(rate).all()
        outs.append(w_hat.detach())
    assert not torch.equal(outs[0], outs[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------- the seed tensor
def test_draw_seed_is_an_int_eagerly_and_takes_the_generators_value():
    torch.manual_seed(5)
    a = ref_philox.draw_seed()
    torch.manual_seed(5)
    b = torch.randint(0, 2**62, (), dtype=torch.int64)
    assert isinstance(a, int) and a == int(b)


@pytest.mark.parametrize("be", BACKENDS)
def test_seed_tensor_rules_and_value(be):
    """A seed tensor must be a 0-dim int64 CPU tensor (TypeError naming seed); eagerly its
    value is checked as an int's and gives the int's bits, on every backend."""
    _skip_unless(be)
    torch.manual_seed(0)
    m = EntropyBottleneck(4)
    mats, biases, facs = (list(getattr(m, k)) for k in ("matrices", "biases", "factors"))
    y = torch.randn(3, 4)
    want = entropy_bottleneck(y, mats, biases, facs, seed=2**62 + 17, rho=0.25, backend=be)
    got = entropy_bottleneck(y, mats, biases, facs, seed=torch.tensor(2**62 + 17), rho=0.25, backend=be)
    assert torch.equal(got.y_hat, want.y_hat) and torch.equal(got.rate, want.rate)
    for bad in (torch.tensor([3]), torch.tensor(3, dtype=torch.int32), torch.tensor(3.0)):
        with pytest.raises(TypeError, match="seed as a tensor must be a 0-dim int64 CPU tensor"):
            entropy_bottleneck(y, mats, biases, facs, seed=bad, backend=be)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        entropy_bottleneck(y, mats, biases, facs, seed=torch.tensor(-1), backend=be)


@pytest.mark.parametrize("be", BACKENDS)
def test_philox_ops_take_a_seed_tensor(be):
    if be != "reference":
        backend_or_skip(be, "cpu")
    s = 123456789012345
    for fn, args in ((ops_philox.philox_uniform, ()), (ops_philox.philox_keep_mask, (0.3,))):
        want = fn((4, 5), s, 7, *args, backend=be)
        assert torch.equal(fn((4, 5), torch.tensor(s), 7, *args, backend=be), want)
        traced = torch.compile(lambda t: fn((4, 5), t, 7, *args, backend=be), fullgraph=True,
                               backend="aot_eager")
        assert torch.equal(traced(torch.tensor(s)), want)
    assert torch.equal(ref_philox.philox_uniform(6, torch.tensor(s), 3), ref_philox.philox_uniform(6, s, 3))


def _traced_cifd_ops(step):
    """The ``cifd``/``cifd_C`` ops in the forward and backward graphs ``torch.compile``
    (fullgraph, AOTAutograd, no Inductor) traces from ``step``; runs it once, with a
    backward through the sum of its outputs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    seen = []

    def record(gm, _):
        for n in gm.graph.nodes:
            # a mutating op (philox_keep_mask_out) is traced functionalized, as the first argument
            # of auto_functionalized
            target = n.args[0] if "auto_functionalized" in str(n.target) else n.target
            if n.op == "call_function" and "cifd" in str(target):
                seen.append(str(target))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    outs = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))()
    sum(o.float().sum() for o in outs if o.requires_grad).backward()
    return seen


def test_drawn_seed_takes_the_cpp_ops_on_cpu():
    """On the "cpu" backend a seed drawn in the graph takes the op an int seed takes: the
    fused C++ ops' sub-ops, traced through their C++ autograd with the seed tensor as an
    argument (the entropy kernels forward and backward, the loss kernel and the keep
    flags); no Python custom op (``cifd::``) in either graph."""
    _skip_unless("cpu")
    if "cpu" not in _backend.implemented("cifd_loss"):
        pytest.skip("cpu cifd_loss kernels not registered in this build")
    torch.manual_seed(0)
    ibm = IBM(6, rho=0.25, s=0.5, backend="cpu")
    loss_fn = CIFDLoss(lam=[1.0, 0.5], p_drop=0.5, backend="cpu")
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 6, generator=g, requires_grad=True)
    z = torch.randn(5, 4, generator=g, requires_grad=True)
    tl = torch.randn(2, 5, 4, generator=g)
    labels = torch.randint(0, 4, (5,), generator=g)
    x = torch.randn(2, 5, 6, generator=g)

    def step():
        w_hat, rate = ibm(y)
        return loss_fn(z, tl, labels, w_hat, x, ibm_rate=rate)[:1]

    seen = _traced_cifd_ops(step)
    for op in ("cifd_C.entropy_bottleneck_fwd.default", "cifd_C.entropy_bottleneck_bwd.default",
               "cifd_C.cifd_loss_fwd.default", "cifd_C.philox_keep_mask_out.default"):
        assert op in seen, (op, seen)
    assert not [s for s in seen if s.startswith("cifd.")], seen
