# SPDX-License-Identifier: Apache-2.0
"""The README's Python examples run as written (so they cannot rot)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2
    assert any("CIFDLoss" in b and "RDMBank" in b and "IBM" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i):
    torch.manual_seed(0)
    ns = {"__name__": f"readme_block_{i}"}
    exec(compile(BLOCKS[i], f"README.md:python-block-{i}", "exec"), ns)
    if "loss" in ns and isinstance(ns["loss"], torch.Tensor):
        assert torch.isfinite(ns["loss"]).all()
