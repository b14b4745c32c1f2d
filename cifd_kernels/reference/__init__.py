# SPDX-License-Identifier: Apache-2.0
"""Eager PyTorch reference of the whole CIFD method: fp32 inside, the test oracle
and benchmark baseline. Everything random comes from :mod:`.philox`."""
from .philox import draw_seed, philox_keep_mask, philox_noise, philox_uniform, philox_words, uint_to_uniform  # noqa: F401
