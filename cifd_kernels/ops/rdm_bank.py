# SPDX-License-Identifier: Apache-2.0
"""The fused RDM bank (docs/METHOD.md section 2): N RDMs on one teacher embedding,
encode -> noisy channel -> decode -> head, and their stage-1 losses.

Same math, arguments, noise counters and outputs as
:func:`cifd_kernels.reference.rdm.rdm_bank_forward` / ``rdm_bank_loss``; the
reference runs N chains of small ops, this path runs the bank as::

    h1   = act(X W1cat^T + b1cat)          one GEMM [B, D] x [D, N*H] (shared input)
    z    = h1 W2^T + b2                    one batched GEMM over the N blocks
    zh, rate, p = entropy_bottleneck(z)    the fused rate kernel (noise, density, log)
    xh   = act(zh W3^T + b3) W4^T + b4     batched GEMMs
    V    = xh W5^T + b5                    batched GEMM (none when K = 0)
    loss = sum_n R_n dist + rate + CE + tau^2 KL   one fused loss kernel call (cifd::cifd_loss, N groups)

Head-less banks (K = 0: ``params`` without ``head.*``, the paper's CLIP setting):
no head GEMM, ``logits`` an empty ``[N, B, 0]``, and the loss ``R_n dist + rate``
through the SAME fused loss kernel with its logit part off: K = 0 logits, every
label ``ignore_index``, ``lam_ce = lam_kl = 0``. The kernels take K = 0 as is (no
logit is read or written: the sweeps over K are empty; the CE of an ignored row is
0 and the KL of no classes 0, whatever the empty log-sum-exp, -inf, holds), so the
result is that of a headed bank with ``lam_ce = lam_kl = 0`` and no labels or
teacher logits, to the bit. Labels or teacher logits for a head-less bank raise
ValueError (the reference's :func:`~cifd_kernels.reference.rdm.check_headless`,
before a backend is chosen).

Backends (``cifd::`` ops underneath):

* ``cpu``: ATen GEMMs (bias fused into ``addmm``/``baddbmm``), the C++ entropy and
  loss kernels;
* ``cuda``: cuBLAS GEMMs through ATen, the CUDA entropy kernel and the fastest loss
  kernel registered for CUDA tensors;
* ``triton``: Triton batched GEMMs with bias + activation fused in the epilogue
  (``cifd::rdm_linear``), the Triton entropy and loss kernels.

The bank's entropy model is one density over N*L channels and the noise of RDM n,
sample b, latent l is Philox counter ``offset + n*B*L + b*L + l``: the channel is
one call of :func:`cifd_kernels.ops.entropy_bottleneck` with ``groups=N`` on the
``[N, B, L]`` latent, group n being RDM n's ``[B, L]`` block on the channel slice
``n*L .. n*L + L - 1`` of the density at offset ``offset + n*B*L``: exactly that
counter layout. The bank has no channel code of its own.

The stage-1 losses of all N RDMs are one launch of the fused loss kernel: one
pass over every RDM's logits and reconstruction that writes their gradients in the
same pass (Liger-Kernel style), the N RDMs being the kernel's groups (shared
teacher rows and labels, ``R_n`` as group n's distortion weight). The teacher's
embedding and logits are frozen there (no gradient); ``auto`` sends a call where
they require grad to the reference, a named backend raises.

Kernel paths take float32/float16/bfloat16 parameters (all one dtype; ``x`` is
cast to it) and the entropy model's fast path ``filters=(3, 3, 3, 3)``; GEMMs and
outputs are in the parameters' dtype, the entropy and loss math in fp32 (the
reference upcasts everything to fp32). ``R`` must be Python numbers on the kernel
paths (a tensor ``R`` goes to the reference under ``auto``: reading it would be a
host sync).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import backend as _backend
from ..reference import _checks
from ..reference import entropy_bottleneck as _ref_eb
from ..reference import rdm as _ref
from ..reference.philox import check_seed_offset
from . import _eager
from . import density_pack as _pack
from .entropy_bottleneck import OP as _EB_OP
from .entropy_bottleneck import entropy_bottleneck as _entropy_bottleneck
from .cifd_loss import grouped_loss as _grouped_loss

OP = "rdm_bank"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["rdm_bank_forward", "rdm_bank_loss", "rdm_linear"]


def _triton():
    from .._triton import rdm_bank as m
    return m


# ----------------------------------------------------------------------------- cifd::rdm_linear
_ACT_CODES = {"none": 0, "relu": 1, "gelu": 2}


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: str, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``act(x W^T + b)``: x [B, I] (shared by all N blocks) or [N, B, I],
    weight [N, O, I], bias [N, O] -> (y [N, B, O], pre-activation [N, B, O] for gelu,
    else an empty tensor)."""
    if backend == "triton":
        return _triton().rdm_linear_fwd(x, weight, bias, _ACT_CODES[act])
    pre = torch.baddbmm(bias.unsqueeze(1), x.expand(weight.shape[0], *x.shape[-2:]),
                        weight.transpose(1, 2))
    return _act(pre, act), (pre if act == "gelu" else pre.new_empty((0,)))


_linear_op = torch.library.custom_op("cifd::rdm_linear", mutates_args=())(_linear_impl)


@_linear_op.register_fake
def _(x, weight, bias, act, backend):
    y = x.new_empty((weight.shape[0], x.shape[-2], weight.shape[1]))
    return y, (torch.empty_like(y) if act == "gelu" else x.new_empty((0,)))


def _setup_linear(ctx, inputs, output):
    x, weight, bias, act, backend = inputs
    y, pre = output
    ctx.act = act
    ctx.shared = x.dim() == 2
    # relu's derivative reads the output, gelu's the pre-activation, "none" neither.
    ctx.save_for_backward(x, weight, y if act == "relu" else pre)


def _linear_backward(ctx, g_y, g_pre):
    x, weight, saved = ctx.saved_tensors
    if g_y is None:  # only the pre-activation was used (the eager path passes None)
        return None, None, None, None, None
    g = g_y
    if ctx.act == "relu":
        g = g_y * (saved > 0).to(g_y.dtype)
    elif ctx.act == "gelu":
        g = torch.ops.aten.gelu_backward(g_y, saved)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.bmm(g, weight)  # [N, B, I]
        if ctx.shared:
            grad_x = grad_x.sum(0)
    if ctx.needs_input_grad[1]:
        xx = x.expand(weight.shape[0], *x.shape[-2:])
        grad_w = torch.bmm(g.transpose(1, 2), xx)
    if ctx.needs_input_grad[2]:
        grad_b = g.sum(1)
    return grad_x, grad_w, grad_b, None, None


_linear_op.register_autograd(_linear_backward, setup_context=_setup_linear)
_LinearFunction = _eager.autograd_function("RDMLinearFunction", _linear_impl, _setup_linear,
                                          _linear_backward)


def _act(h: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return torch.relu(h)
    if act == "gelu":
        return F.gelu(h)
    return h


def rdm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: str = "none",
               backend: Optional[str] = None) -> torch.Tensor:
    """N independent ``act(x W_n^T + b_n)`` in one batched GEMM: ``x`` [B, I] (one
    input shared by the N blocks, the bank's first layer) or [N, B, I], ``weight``
    [N, O, I], ``bias`` [N, O] -> [N, B, O] in ``x``'s dtype. ``act``: ``none``,
    ``relu``, ``gelu`` (erf form). On ``triton`` bias and activation are fused into the
    GEMM's epilogue; elsewhere ATen GEMMs (``baddbmm``, bias fused) then the activation."""
    if act not in _ACT_CODES:
        raise ValueError(f"act must be one of {tuple(_ACT_CODES)}, got {act!r}")
    for name, t, nd in (("x", x, None), ("weight", weight, 3), ("bias", bias, 2)):
        _checks.check_tensor(name, t, ndim=nd)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [B, I] or [N, B, I], got shape {tuple(x.shape)}")
    n, o, i = weight.shape
    _checks.check_dim("x", x.shape[-1], i, "the weight's input width")
    if x.dim() == 3:
        _checks.check_dim("x", x.shape[0], n, "the block count N")
    _checks.check_dim("bias", bias.shape[0], n, "the block count N")
    _checks.check_dim("bias", bias.shape[1], o, "the weight's output width")
    _checks.check_same_device("x", x, weight=weight, bias=bias)
    if not (x.dtype == weight.dtype == bias.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                         f"{bias.dtype}")
    be = _backend.resolve("rdm_linear", backend, x.device)
    if be == "reference" or x.dtype not in _KERNEL_DTYPES:
        pre = torch.baddbmm(bias.unsqueeze(1), x.expand(n, *x.shape[-2:]), weight.transpose(1, 2))
        return _act(pre, act)
    return _eager.call(_linear_op, _LinearFunction, x, weight, bias, act, be)[0]


# ----------------------------------------------------------------------------- the bank forward
def _param_dtype(params: Mapping[str, torch.Tensor]) -> Optional[torch.dtype]:
    dts = {params[p].dtype for p in _ref.PARAM_NAMES if p in params}  # no head.*: K = 0
    return dts.pop() if len(dts) == 1 else None


def _kernel_why(x, params, matrices) -> Optional[str]:
    dt = _param_dtype(params)
    if dt not in _KERNEL_DTYPES:
        return "float32/float16/bfloat16 parameters of one dtype"
    if x.dtype not in _KERNEL_DTYPES:
        return "a float32/float16/bfloat16 x"
    if not _pack.supports(matrices) or any(m.dtype == torch.float64 for m in matrices):
        return "an entropy model with filters=(3, 3, 3, 3) and no float64 parameters"
    return None


def rdm_bank_forward(x: torch.Tensor, params: Mapping[str, torch.Tensor], matrices, biases, factors,
                     medians: Optional[torch.Tensor] = None, *, act: str = "relu",
                     mode: str = "noise", seed: int = 0, offset: int = 0,
                     likelihood_bound: float = 1e-9, need_likelihood: bool = True,
                     need_rate: bool = True,
                     backend: Optional[str] = None) -> _ref.RDMBankOutput:
    """Run N RDMs on the same teacher embedding (fused; see the module docstring).

    Arguments and outputs as :func:`cifd_kernels.reference.rdm.rdm_bank_forward`, plus
    ``need_likelihood`` (False: ``likelihoods`` is None, saving an [N, B, L] write),
    ``need_rate`` (False: the channel only quantizes, as the reference's
    ``quantize_latent``, and ``rate`` and ``likelihoods`` are None: the frozen bank's
    stage-2 targets need no density evaluation) and ``backend``
    (``auto|cuda|triton|cpu|reference``). Kernel paths return outputs in the
    parameters' dtype (``rate`` and ``likelihoods`` float32). ``params`` without
    ``head.*`` is a head-less bank (K = 0): no head GEMM, ``logits`` ``[N, B, 0]``."""
    _ref.check_bank_forward_hparams(act, mode, likelihood_bound)
    _checks.check_tensor("x", x, ndim=2)
    n, d, h, l, k = _ref.bank_sizes(params)
    _ref_eb.check_params(matrices, biases, factors)
    _checks.check_same_device("x", x, **{"params['enc1.weight']": params["enc1.weight"],
                                           "matrices[0]": matrices[0]})
    be = _backend.resolve_kernel(OP, backend, x.device, lambda _: _kernel_why(x, params, matrices))
    if be == "reference":
        out = _ref.rdm_bank_forward(x, params, matrices, biases, factors, medians, act=act, mode=mode,
                                    seed=seed, offset=offset, likelihood_bound=likelihood_bound)
        if not need_rate:
            return out._replace(likelihoods=None, rate=None)
        return out if need_likelihood else out._replace(likelihoods=None)

    _checks.check_dim("x", x.shape[1], d, "the embedding dim D")
    _checks.check_dim("matrices[0]", matrices[0].shape[0], n * l, "the channel count N*L")
    batch = x.shape[0]
    if mode == "dequantize":
        if medians is None:
            raise ValueError("mode='dequantize' needs medians [N * L]")
        _checks.check_tensor("medians", medians, ndim=1)
        _checks.check_dim("medians", medians.shape[0], n * l, "the channel count N*L")
        med = medians.float()
    else:
        med = None
    check_seed_offset(seed, offset, n * batch * l)
    lin_be = "triton" if be == "triton" else "reference"  # reference: ATen GEMMs (cuBLAS on GPU)
    p = params
    xx = x.to(_param_dtype(params))

    # Encoder. The first layer's N blocks share x: one GEMM [B, D] x [D, N*H].
    if lin_be == "triton":
        h1 = rdm_linear(xx, p["enc1.weight"], p["enc1.bias"], act, backend="triton")  # [N, B, H]
    else:
        h1 = torch.addmm(p["enc1.bias"].reshape(n * h), xx, p["enc1.weight"].reshape(n * h, d).t())
        h1 = _act(h1, act).view(batch, n, h).transpose(0, 1)  # [N, B, H] (strided view)
    z = rdm_linear(h1, p["enc2.weight"], p["enc2.bias"], "none", backend=lin_be)  # [N, B, L]

    if not need_rate:  # the channel alone: elementwise, the reference's own ops (same bits)
        z_hat = _ref.quantize_latent(z.float(), mode, seed, offset, med).to(z.dtype)  # fp32, as the kernel
        return _decode(p, z, z_hat, act, lin_be, None, None)

    # Channel: the entropy op with groups = N, RDM n the [B, L] block n (counter layout above).
    z_hat, rate, lik = _entropy_bottleneck(z, matrices, biases, factors, med, mode=mode, seed=seed,
                                           offset=offset, bound=float(likelihood_bound),
                                           need_likelihood=bool(need_likelihood), deterministic=True,
                                           backend=be, groups=n)
    return _decode(p, z, z_hat, act, lin_be, lik, rate)


def _decode(p, z, z_hat, act, lin_be, lik, rate) -> _ref.RDMBankOutput:
    """Decoder and head on the channel's output."""
    h3 = rdm_linear(z_hat, p["dec1.weight"], p["dec1.bias"], act, backend=lin_be)
    x_hat = rdm_linear(h3, p["dec2.weight"], p["dec2.bias"], "none", backend=lin_be)
    return _ref.RDMBankOutput(z, z_hat, x_hat, _head(p, x_hat, lin_be), lik, rate)


def _head(p, x_hat, lin_be) -> torch.Tensor:
    """The head's logits [N, B, K]; a head-less bank (no ``head.*``, K = 0): an empty
    [N, B, 0] in x_hat's dtype, outside the graph (as the reference's)."""
    if "head.weight" not in p:
        return x_hat.new_zeros((x_hat.shape[0], x_hat.shape[1], 0))
    return rdm_linear(x_hat, p["head.weight"], p["head.bias"], "none", backend=lin_be)


# ----------------------------------------------------------------------------- the stage-1 loss
def rdm_bank_loss(x: torch.Tensor, x_hat: torch.Tensor, logits: torch.Tensor, rate: torch.Tensor,
                  R: Union[Sequence[float], torch.Tensor], labels: Optional[torch.Tensor] = None,
                  teacher_logits: Optional[torch.Tensor] = None, *, dist: str = "mse",
                  lam_ce: float = 1.0, lam_kl: float = 1.0, tau: float = 1.0,
                  ignore_index: int = -100, backend: Optional[str] = None):
    """Stage-1 loss of every RDM, fused: arguments and return as
    :func:`cifd_kernels.reference.rdm.rdm_bank_loss`, plus ``backend``.

    One pass of the fused loss kernel over all N RDMs' logits and reconstructions
    (:func:`cifd_kernels.ops.cifd_loss.grouped_loss`: the N RDMs are the kernel's groups,
    sharing the teacher's logits, embedding and labels) computes every
    ``R_n dist + lam_ce CE + lam_kl tau^2 KL`` and its gradients; the rate mean is plain
    torch. On the kernel paths the terms other than ``loss`` and ``rate`` are
    detached (values only).

    Head-less banks (``logits`` ``[N, B, 0]``, K = 0): ``R_n dist + rate``, through the
    same kernel with the logit part off (module docstring); ``labels`` and
    ``teacher_logits`` must be None, on every backend (the reference's check and
    message, before a backend is chosen)."""
    _checks.check_tensor("x_hat", x_hat, ndim=3)
    _checks.check_tensor("logits", logits, ndim=3)
    _ref.check_headless(logits.shape[2], labels, teacher_logits, "rdm_bank_loss: the bank")
    why = None
    if isinstance(R, torch.Tensor):
        why = "R as Python numbers (a tensor R would need a host read)"
    elif x.requires_grad or (teacher_logits is not None and teacher_logits.requires_grad):
        why = "a frozen x and teacher_logits (none requiring grad)"
    elif x_hat.dtype not in _KERNEL_DTYPES or logits.dtype not in _KERNEL_DTYPES:
        why = "float32/float16/bfloat16 x_hat and logits"
    be = _backend.resolve_kernel(OP, backend, x_hat.device, lambda _: why)
    kw = dict(dist=dist, lam_ce=lam_ce, lam_kl=lam_kl, tau=tau, ignore_index=ignore_index)
    if be == "reference":
        return _ref.rdm_bank_loss(x, x_hat, logits, rate, R, labels, teacher_logits, **kw)

    # The reference's checks, in its order, on metadata only.
    _ref.check_rdm_loss_hparams("rdm_bank_loss", dist=dist, tau=tau, ignore_index=ignore_index,
                                lam_ce=lam_ce, lam_kl=lam_kl)
    n, batch, _, _ = _ref.check_bank_loss_inputs(x, x_hat, logits, rate, labels, teacher_logits)
    R = _ref.check_R(R, n, "rdm_bank_loss")

    loss_be = be if be in _backend.implemented("cifd_loss") else None  # None: auto
    # Left-out terms: CE with every label ignored is 0, KL with lam_kl = 0 is 0 (the KL
    # target is then a stand-in: RDM 0's own logits). Head-less (K = 0) is the case of
    # both left out, over K = 0 classes: the kernels read and write no logit.
    lab = labels if labels is not None else torch.full((batch,), ignore_index, dtype=torch.long,
                                                       device=x.device)
    t_logits = (teacher_logits if teacher_logits is not None else logits[0]).detach()[None]
    loss_g, ce_g, kl_mg, emb_mg = _grouped_loss(
        logits, t_logits.to(logits.dtype), lab, x_hat, x.to(x_hat.dtype)[None],
        _floats_on(R, x.device), tau=tau, lam_ce=lam_ce if labels is not None else 0.0,
        lam_kl=lam_kl if teacher_logits is not None else 0.0, dist=dist, ignore_index=ignore_index,
        backend=loss_be)
    zero = torch.zeros(n, dtype=torch.float32, device=x.device)
    rate_n = rate.float().mean(-1)
    loss_n = loss_g + rate_n
    terms = {"dist": emb_mg[0], "rate": rate_n, "ce": ce_g if labels is not None else zero,
             "kl": kl_mg[0] if teacher_logits is not None else zero, "loss": loss_n}
    return loss_n.sum(), terms


def _floats_on(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor of Python numbers on ``device``, without a host sync: on a GPU
    through pinned memory and a non-blocking copy (a pageable copy would wait for the
    stream); under ``torch.compile`` a plain constant."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    return torch.tensor(values, dtype=torch.float32).pin_memory().to(device, non_blocking=True)


def _register() -> None:
    _backend.register("rdm_linear", "triton")
    kernels = set(_backend.implemented(_EB_OP)) - {"reference"}
    _backend.register(OP, *sorted(kernels))


_register()
