# SPDX-License-Identifier: Apache-2.0
"""The cost of CIFD's stage 2 over plain KD: one full training step of the same
student on the same batch (forward, loss, backward, SGD step), with and without
the CIFD terms (docs/METHOD.md section 4; the paper reports 1.08x).

Providers (``baseline`` = ``kd``):

* ``kd``: student forward, Hinton KD loss (CE + tau^2 KL to the teacher's logits,
  :func:`cifd_kernels.training.distill.kd_loss`), backward, optimizer step;
* ``cifd``: the same student wrapped as in ``cifd distill --method cifd`` (IBM on
  its embedding, the decoder to the teacher's width), ``CIFDLoss`` against the
  teacher and N = 3 RDM targets with KD-dropout, backward, optimizer step; the
  ops on ``auto`` (the C++ kernels on the CPU, CUDA/Triton on a GPU).

Scenarios (the ``shape`` id is (B, scenario)):

* ``cached`` (scenario 0): the recipe's default without augmentation: teacher and
  frozen-bank outputs are computed once per dataset and indexed per batch, so a
  step reads targets (KD: [B, K]; CIFD: [M, B, K] + [M, B, D]);
* ``online`` (scenario 1): with augmentation: every step also runs the teacher
  (KD and CIFD) and the frozen RDM bank in eval mode (CIFD), under no_grad.

Models: the Fashion-MNIST recipe's cnn10 teacher (D = 128) and cnn2 student; 28x28
inputs; models and inputs NHWC (channels_last, the recipe's default); SGD with momentum, fused as in the recipe (``engine.fused_kwargs``). Mode
``full`` only (a training step).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.utils import Budget, shape_id

OP = "cifd_step"
SHAPES = ((128, 0), (128, 1), (512, 0))  # (B, scenario): 0 cached targets, 1 online teacher + bank
PROVIDERS = ("kd", "cifd")
N_RDM, K, TAU = 3, 10, 2.0
# The quantity of interest is a ratio of two close times: more rounds than the default CPU budget.
CPU_STEP_BUDGET = Budget(warmup=2, warmup_s=0.3, max_warmup=10, budget_s=4.0, min_rounds=15, max_rounds=200)


def _setup(provider: str, batch: int, online: bool, device):
    from cifd_kernels import CIFDLoss, RDMBank
    from cifd_kernels.training.cifd import CIFDStudent
    from cifd_kernels.training.distill import kd_loss
    from cifd_kernels.training.engine import fused_kwargs
    from cifd_kernels.training.models import build_model

    # NHWC models and inputs, as the recipe lays them out (train.channels_last, the
    # default): NCHW max-pooling alone takes 10 ms a step on the CPU against 1 ms.
    nhwc = torch.channels_last
    torch.manual_seed(0)
    teacher = build_model("cnn10", K).to(device, memory_format=nhwc).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    D = teacher.embed_dim
    bank = RDMBank(N_RDM, D, D, D, K, R=(10.0, 1.0, 0.3)).to(device).eval()
    student = build_model("cnn2", K).to(device, memory_format=nhwc).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(device, memory_format=nhwc)
    y = torch.randint(0, K, (batch,), generator=g).to(device)
    with torch.no_grad():
        emb = teacher.features(x)
        x_hat, logits = bank.frozen_targets(emb)
        cached = (torch.cat([emb[None], x_hat]), torch.cat([teacher.head(emb)[None], logits]))

    def targets():
        if not online:
            return cached
        with torch.no_grad():
            e = teacher.features(x)
            x_hat, logits = bank.frozen_targets(e)
            return torch.cat([e[None], x_hat]), torch.cat([teacher.head(e)[None], logits])

    if provider == "kd":
        params = list(student.parameters())
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, **fused_kwargs(params))

        def step():
            if online:  # KD runs only the teacher, no bank
                with torch.no_grad():
                    t_logits = teacher.head(teacher.features(x))
            else:
                t_logits = cached[1][0]
            loss = kd_loss(student(x), t_logits, y, tau=TAU)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    wrapper = CIFDStudent(student, D, s=0.1).to(device).train()
    params = list(wrapper.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, **fused_kwargs(params))
    loss_fn = CIFDLoss(lam=[1.0] * (N_RDM + 1), tau=TAU, p_drop=0.25, w_emb=1.0)  # paper units: 1/D on the sum
    count = [0]

    def step():
        t_embs, t_logits = targets()
        count[0] += 1
        logits, u, rate = wrapper.train_outputs(x, seed=count[0])
        loss, _ = loss_fn(logits, t_logits, y, u, t_embs, rate, seed=count[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _bytes(batch: int) -> int:
    return batch * 28 * 28 * 4  # the input images (the step is compute-bound; GB/s is not meaningful)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cifd_step(bench, shape, provider):
    batch, scenario = shape
    if scenario == 1 and batch > 128 and not bench.on_gpu:
        pytest.skip("online scenario at large B: GPU only")
    fn = _setup(provider, batch, scenario == 1, bench.device)
    bench.run(fn, op=OP, provider=provider, shape=shape, mode="full", dtype=torch.float32,
              bytes_moved=_bytes(batch), baseline="kd", warmup=2,
              budget=None if bench.on_gpu else CPU_STEP_BUDGET)
