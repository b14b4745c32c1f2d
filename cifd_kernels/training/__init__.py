# SPDX-License-Identifier: Apache-2.0
"""Distillation recipes: data, models, configuration, training loop, CLI.

- :mod:`.data`: Fashion-MNIST (IDX), CIFAR-100 (pickles) in memory with batched
  tensor augmentation and a resumable, shardable batch iterator; ImageFolder.
- :mod:`.models`: the simple-CNN study (cnn10 teacher, cnn8/6/4 TAs, cnn2
  student) and torchvision ResNet18/34/50, MobileNetV2, all with
  ``features(x) -> [B, D]`` and ``head``.
- :mod:`.config`: YAML + dotted overrides into dataclasses; config hashes.
- :mod:`.engine`: the epoch loop, atomic checkpoints, exact resume, metrics log.
- :mod:`.teacher`, :mod:`.distill`: the recipes (teacher; scratch, KD and
  TAKD students) and the teacher-output cache that stage 1 trains on.
- :mod:`.rdms`: CIFD stage 1, the RDM bank (``train-rdms``), its evaluation
  and rate-distortion plot.
- :mod:`.cifd`: CIFD stage 2, the student with IBM and decoder.
- :mod:`.demo`: the whole study with a comparison table and plots.
- :mod:`.cli`: ``cifd`` / ``python -m cifd_kernels`` commands, ``main(argv)``.

Submodules import lazily: ``import cifd_kernels.training`` costs nothing.
"""
__all__ = ["cifd", "cli", "config", "data", "demo", "distill", "engine", "models", "rdms",
           "teacher"]


def __getattr__(name):
    if name in __all__:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
