"""The paper's networks: exact parameter counts, structure, and forward/backward on every kind."""

import pytest
import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import (
    CONV_KINDS,
    DepthwiseConv2d,
    GroupConv2d,
    StemConv2d,
    TwoLevelGroupConv2d,
)
from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.paper import PAPER_PARAMS_M, TOLERANCE_M
from twolevel_dist.params import count_millions, format_markdown, main, paper_table


@pytest.mark.parametrize("key", sorted(PAPER_PARAMS_M), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_parameter_counts_match_the_paper(key):
    network, conv, groups = key
    ours = count_millions(network, conv, groups)
    assert abs(ours - PAPER_PARAMS_M[key]) <= TOLERANCE_M[network] + 1e-9, (key, ours)
    if network.startswith("WRN"):
        assert f"{ours:.2f}" == f"{PAPER_PARAMS_M[key]:.2f}"


def test_mobilenet_gc2l_with_coarse_last_conv_gives_the_independent_count():
    # DESIGN.md: with every 1x1 replaced by GC-2L, an independent count gives 2.471/1.960/1.734.
    for n, expected in [(2, 2.471), (4, 1.960), (8, 1.734)]:
        assert count_millions("MobileNetV2", "gc2l", n, coarse_last_conv=True) == pytest.approx(
            expected, abs=0.0005)


def test_wrn_gc2l_count_follows_the_layer_formula():
    # Every replaced layer adds C_in k^2 + N C_out to GC: sum the formula over the real layers.
    model = build_model("wrn", conv="gc2l", groups=4, depth=16, widen=4)
    gc = build_model("wrn", conv="gc", groups=4, depth=16, widen=4)
    extra = sum(m.in_channels * m.kernel_size ** 2 + m.groups * m.out_channels
                for m in model.modules() if isinstance(m, TwoLevelGroupConv2d))
    assert count_parameters(model) == count_parameters(gc) + extra


def test_params_command_prints_markdown_and_succeeds(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "| WRN-28-10 | gc2l | 16 | 2.540 | 2.54 | yes |" in out
    assert out.count("| yes |") == len(PAPER_PARAMS_M)


def test_format_marks_mismatches():
    rows = paper_table()[:1]
    rows[0] = {**rows[0], "ours_M": 1.0, "match": False}
    assert "| NO |" in format_markdown(rows)


@pytest.mark.parametrize("conv", sorted(CONV_KINDS))
@pytest.mark.parametrize("name,kwargs,size", [
    ("wrn", dict(depth=10, widen=2), 32),
    ("wrn_imagenet", dict(depth=18, widen=1), 64),
    ("mobilenet_v2", dict(width_mult=0.5), 64),
])
def test_every_network_and_kind_runs_forward_and_backward(conv, name, kwargs, size):
    groups = 1 if conv == "sc" else 4
    model = build_model(name, conv=conv, groups=groups, num_classes=7, **kwargs)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    replaced = [m for m in model.modules() if isinstance(m, CONV_KINDS[conv])]
    assert replaced, "no convolution was replaced"


def test_every_convolution_but_stem_and_depthwise_is_replaced():
    model = build_model("mobilenet_v2", conv="gc2l", groups=2, coarse_last_conv=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert {type(m) for m in convs} == {StemConv2d, DepthwiseConv2d}
    assert sum(isinstance(m, StemConv2d) for m in convs) == 1
    # 17 blocks: 16 expansions + 17 projections, plus the final 320->1280.
    assert sum(isinstance(m, TwoLevelGroupConv2d) for m in model.modules()) == 34
    default = build_model("mobilenet_v2", conv="gc2l", groups=2)
    last = [m for m in default.modules() if isinstance(m, (TwoLevelGroupConv2d, GroupConv2d))][-1]
    assert type(last) is GroupConv2d and last.out_channels == 1280


def test_wrn_shortcuts_only_where_channels_change():
    model = build_model("wrn", conv="gc2l", groups=2, depth=16, widen=2)
    blocks = [b for stage in model.stages for b in stage]
    assert [b.shortcut is not None for b in blocks] == [True, False, True, False, True, False]
    assert blocks[0].shortcut.kernel_size == 1


def test_initialisation_is_he_normal_over_fan_in():
    torch.manual_seed(0)
    model = build_model("wrn", conv="gc2l", groups=4, depth=10, widen=8)
    layer = model.stages[1][0].conv2           # 256 -> 256, 3x3, N = 4: fan-in 64 * 9
    std = layer.weight.std().item()
    assert std == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


@pytest.mark.parametrize("call,message", [
    (lambda: build_model("resnet"), "unknown model"),
    (lambda: build_model("wrn", depth=27), "6n\\+4"),
    (lambda: build_model("wrn", widen=0), "positive"),
    (lambda: build_model("wrn", dropout=1.5), "dropout"),
    (lambda: build_model("wrn", width_mult=2), "unknown argument"),
    (lambda: build_model("wrn", conv="gc", groups=3, depth=10), "must divide"),
    (lambda: build_model("wrn_imagenet", depth=50), "depth must be one of"),
    (lambda: build_model("mobilenet_v2", width_mult=-1), "width_mult"),
    (lambda: build_model("mobilenet_v2", conv="sc", groups=2), "no groups"),
])
def test_bad_model_arguments_raise_clear_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


@pytest.mark.parametrize("conv,groups", [("sc", 1), ("gc2l", 8), ("shuffle", 8), ("flgc", 8)])
def test_mobilenet_v2_for_32x32_images_keeps_the_parameters_and_a_4x4_last_map(conv, groups):
    # model=mobilenet_v2_cifar (the reduced CPU protocol's network, at its width 0.5): the stem
    # and the 24-channel stage keep stride 1, which changes no parameter count.
    common = dict(conv=conv, groups=groups, num_classes=10, width_mult=0.5)
    cifar = build_model("mobilenet_v2", small_input=True, **common)
    imagenet = build_model("mobilenet_v2", **common)
    assert count_parameters(cifar) == count_parameters(imagenet)
    assert cifar.features(torch.randn(2, 3, 32, 32)).shape[2:] == (4, 4)
    assert imagenet.features(torch.randn(2, 3, 32, 32)).shape[2:] == (1, 1)
