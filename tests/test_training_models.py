# SPDX-License-Identifier: Apache-2.0
"""Model zoo: the simple-CNN study and the torchvision wrappers share one interface."""
import pytest
import torch

from cifd_kernels.training import models


@pytest.mark.parametrize("arch", list(models.CNN_STAGES))
def test_simple_cnn_interface(arch):
    torch.manual_seed(0)
    m = models.build_model(arch, 10).eval()
    x = torch.randn(3, 1, 28, 28)
    f = m.features(x)
    assert f.shape == (3, m.embed_dim) and m.embed_dim == models.CNN_STAGES[arch][-1][-1]
    assert isinstance(m.head, torch.nn.Linear) and m.head.out_features == 10
    torch.testing.assert_close(m(x), m.head(f))
    assert m.num_conv_layers == int(arch[3:])
    m.train()(x).sum().backward()  # trains


def test_cnn_capacity_ordering():
    sizes = [models.count_parameters(models.build_model(a, 10)) for a in
             ("cnn2", "cnn4", "cnn6", "cnn8", "cnn10")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 5


def test_cnn_other_input_shapes():
    m = models.build_model("cnn6", 100, in_channels=3).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("arch,native", [("resnet18", 512), ("resnet34", 512),
                                          ("resnet50", 2048), ("mobilenet_v2", 1280)])
def test_torchvision_small_input(arch, native):
    pytest.importorskip("torchvision")
    m = models.build_model(arch, 100, in_channels=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (2, native) and m.embed_dim == native
    torch.testing.assert_close(m(x), m.head(f))
    assert m.head.in_features == native and m.head.out_features == 100


def test_torchvision_projection_and_imagenet_stem():
    pytest.importorskip("torchvision")
    m = models.build_model("resnet18", 7, in_channels=3, image_size=224, embed_dim=64).eval()
    assert isinstance(m.backbone.maxpool, torch.nn.MaxPool2d)  # ImageNet stem kept
    f = m.features(torch.randn(2, 3, 64, 64))
    assert f.shape == (2, 64) and m(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_arch_and_bad_embed_dim():
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        models.build_model("vgg", 10)
    with pytest.raises(ValueError, match="embed_dim"):
        models.build_model("cnn2", 10, embed_dim=8)
