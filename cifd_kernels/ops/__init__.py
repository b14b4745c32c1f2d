# SPDX-License-Identifier: Apache-2.0
"""Public functional ops. Each is a ``cifd::`` custom op with backend dispatch,
a fake kernel for torch.compile, and (where differentiable) autograd."""
from .entropy_bottleneck import EntropyBottleneckOutput, entropy_bottleneck  # noqa: F401
from .ibm import ibm  # noqa: F401
from .philox import philox_keep_mask, philox_uniform  # noqa: F401
from .rdm_bank import rdm_bank_forward, rdm_bank_loss, rdm_linear  # noqa: F401
