# SPDX-License-Identifier: Apache-2.0
"""Constants of the packed density layout and the entropy modes, in one place for
every Python layer (the ops, the Triton kernels, the modules); the C++ side spells
them in ``csrc/include/cifd/density.h`` (``kNumPacked``, ``kNumGrad``), and
``tests/test_layers.py`` holds the two to the same values.

Fast path ``filters=(3, 3, 3, 3)`` (widths 1-3-3-3-3-1): the density's parameters
packed per channel as 58 rows (``ops/density_pack.py`` has the row layout); the
kernels' parameter gradient has one more row, the medians' (dequantize mode).
"""
FAST_FILTERS = (3, 3, 3, 3)
NUM_PACKED = 58
NUM_GRAD = NUM_PACKED + 1  # + the medians' gradient row (dequantize mode)
MEDIAN_ROW = NUM_PACKED
MODES = {"noise": 0, "dequantize": 1, "none": 2}
