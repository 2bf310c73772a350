"""Balanced importance-aware partitions and the conversion of an SC WRN into GC / GC-2L."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.models import build_model
from twolevel_dist.selfgroup.convert import convert_to_grouped, permute_channels, wrn_channel_graph
from twolevel_dist.selfgroup.partition import (
    ChannelGraph,
    ChannelSpace,
    GroupedLayer,
    balanced_assignment,
    balanced_partition,
    check_partitions,
    contiguous_partition,
    contiguous_partitions,
    diagonal_mass,
    total_mass,
)

WRN_CIFAR = ("wrn", dict(depth=10, widen=2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second intra-op thread only adds hand-offs, and on a shared
    machine it stalls every op (10x slower seen). Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, so that a wrongly permuted
    BN shows in the outputs (eval mode uses the running statistics)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
        if hasattr(model, "fc"):
            model.fc.bias.copy_(torch.randn(model.fc.out_features, generator=generator))
    return model.eval()


def _sc_wrn(name="wrn", seed=0, num_classes=10, **kwargs):
    torch.manual_seed(seed)
    return _randomise_norms(build_model(name, conv="sc", num_classes=num_classes, **kwargs), seed)


def _random_balanced(graph, groups, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {s.name: torch.randperm(s.channels, generator=generator) % groups for s in graph.spaces}


def _block_diagonal_masked(sc_model, partitions):
    """The SC model with every grouped layer's off-diagonal blocks (under ``partitions``) zeroed:
    what a GC conversion must compute."""
    masked = copy.deepcopy(sc_model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for layer in wrn_channel_graph(sc_model).layers:
            same = (partitions[layer.out_space][:, None] == partitions[layer.in_space][None, :])
            modules[layer.name].weight.mul_(same[:, :, None, None].float())
    return masked.eval()


def _hand_graph(seed=0, planted=False, groups=4):
    """Spaces a (12), b (16), c (8) with layers a->b, b->c and a skip a->c. With ``planted`` the
    importance is block diagonal under a hidden permutation of each space."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"a": 12, "b": 16, "c": 8}
    hidden = {name: torch.randperm(c, generator=generator) % groups for name, c in sizes.items()}
    layers = []
    for name, src, dst in [("ab", "a", "b"), ("bc", "b", "c"), ("ac", "a", "c")]:
        importance = torch.rand(sizes[dst], sizes[src], generator=generator) + 0.1
        if planted:
            importance *= hidden[dst][:, None] == hidden[src][None, :]
        layers.append(GroupedLayer(name, src, dst, importance))
    graph = ChannelGraph(tuple(ChannelSpace(n, c) for n, c in sizes.items()), tuple(layers))
    return graph, hidden


def _assert_balanced(graph, partitions, groups):
    for space in graph.spaces:
        sizes = torch.bincount(partitions[space.name], minlength=groups)
        assert sizes.tolist() == [space.channels // groups] * groups, space.name


# ----------------------------------------------------------------------------- partitions

def test_balanced_assignment_is_exact_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    for channels, groups in [(6, 2), (6, 3), (8, 4), (9, 3)]:
        for integer_ties in (False, True):
            affinity = (torch.randint(0, 3, (channels, groups), generator=generator).double()
                        if integer_ties else torch.randn(channels, groups, generator=generator))
            labels = balanced_assignment(affinity, groups)
            assert torch.bincount(labels, minlength=groups).eq(channels // groups).all()
            got = float(affinity.double().gather(1, labels[:, None]).sum())
            base = [g for g in range(groups) for _ in range(channels // groups)]
            best = max(sum(float(affinity[c, g]) for c, g in enumerate(p))
                       for p in set(itertools.permutations(base)))
            assert got == pytest.approx(best, abs=1e-9)


def test_diagonal_mass_counts_same_group_entries():
    importance = torch.arange(16.0).reshape(4, 4)
    graph = ChannelGraph((ChannelSpace("x", 4), ChannelSpace("y", 4)),
                         (GroupedLayer("L", "x", "y", importance),))
    contiguous = contiguous_partitions(graph, 2)
    assert contiguous["x"].tolist() == [0, 0, 1, 1]
    assert diagonal_mass(graph, contiguous) == 0 + 1 + 4 + 5 + 10 + 11 + 14 + 15
    interleaved = {"x": torch.tensor([0, 1, 0, 1]), "y": torch.tensor([0, 1, 0, 1])}
    assert diagonal_mass(graph, interleaved) == 0 + 2 + 5 + 7 + 8 + 10 + 13 + 15
    assert total_mass(graph) == sum(range(16))


@pytest.mark.parametrize("groups", [2, 4])
def test_balanced_partition_on_a_random_wrn_is_balanced_deterministic_and_not_worse(groups):
    graph = wrn_channel_graph(_sc_wrn(**WRN_CIFAR[1]))
    first = balanced_partition(graph, groups, seed=3)
    second = balanced_partition(graph, groups, seed=3)
    _assert_balanced(graph, first, groups)
    assert all(torch.equal(first[k], second[k]) for k in first)
    kept = diagonal_mass(graph, first)
    assert kept >= diagonal_mass(graph, contiguous_partitions(graph, groups))
    assert kept / total_mass(graph) > 1.0 / groups   # random weights still give something


def test_balanced_partition_on_a_hand_built_graph_is_balanced_and_not_worse():
    graph, _ = _hand_graph(seed=1)
    partitions = balanced_partition(graph, 4, seed=0)
    _assert_balanced(graph, partitions, 4)
    assert diagonal_mass(graph, partitions) >= diagonal_mass(graph,
                                                             contiguous_partitions(graph, 4))
    again = balanced_partition(graph, 4, seed=0)
    assert all(torch.equal(partitions[k], again[k]) for k in partitions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_partition_recovers_a_planted_block_structure(seed):
    graph, hidden = _hand_graph(seed=seed, planted=True)
    whole = total_mass(graph)
    assert diagonal_mass(graph, hidden) == pytest.approx(whole)
    assert diagonal_mass(graph, contiguous_partitions(graph, 4)) < 0.9 * whole
    found = balanced_partition(graph, 4, seed=seed)
    _assert_balanced(graph, found, 4)
    assert diagonal_mass(graph, found) == pytest.approx(whole, rel=1e-12)


def test_a_layer_reading_and_writing_one_space_is_handled():
    graph, _ = _hand_graph(seed=2)
    generator = torch.Generator().manual_seed(0)
    looped = ChannelGraph(graph.spaces, graph.layers + (
        GroupedLayer("bb", "b", "b", torch.rand(16, 16, generator=generator)),))
    partitions = balanced_partition(looped, 4, seed=0)
    _assert_balanced(looped, partitions, 4)
    assert diagonal_mass(looped, partitions) >= diagonal_mass(looped,
                                                              contiguous_partitions(looped, 4))


def test_contiguous_partition_and_group_checks():
    assert contiguous_partition(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    graph, _ = _hand_graph()
    with pytest.raises(ConfigError, match="'a'.*12 channels"):
        balanced_partition(graph, 8)


# ------------------------------------------------------------------------------- permutation

@pytest.mark.parametrize("name,kwargs,size", [
    ("wrn", dict(depth=10, widen=2), 32),
    ("wrn", dict(depth=10, widen=1), 16),            # stem output == first stream
    ("wrn_imagenet", dict(depth=18, widen=1), 64),
])
def test_permute_channels_keeps_the_function(name, kwargs, size):
    model = _sc_wrn(name, **kwargs)
    graph = wrn_channel_graph(model)
    partitions = _random_balanced(graph, 4)
    permuted = permute_channels(model, partitions)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, out = model(x), permuted(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # it really moved the weights, and left the original alone
    assert not torch.equal(permuted.stages[0][0].conv1.weight, model.stages[0][0].conv1.weight)
    assert permute_channels(model, partitions).state_dict().keys() == model.state_dict().keys()


def test_identity_residual_shares_the_space():
    graph = wrn_channel_graph(_sc_wrn(depth=10, widen=1))
    names = [s.name for s in graph.spaces]
    assert names[:3] == ["stem", "stages.0.0.inner", "stages.1.0.inner"]
    conv2 = next(layer for layer in graph.layers if layer.name == "stages.0.0.conv2")
    assert conv2.out_space == "stem"


# -------------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("method", ["contiguous", "selfgroup"])
def test_converted_gc_equals_the_block_diagonal_masked_sc(method):
    name, kwargs = WRN_CIFAR
    sc = _sc_wrn(name, **kwargs)
    gc, report = convert_to_grouped(sc, conv="gc", groups=4, method=method, model_name=name,
                                    model_kwargs=kwargs)
    if method == "contiguous":
        assert all(torch.equal(labels, contiguous_partition(len(labels), 4))
                   for labels in report.partitions.values())
    masked = _block_diagonal_masked(sc, report.partitions)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gc.eval()(x), masked(x), rtol=1e-5, atol=1e-5)
        # the masking matters: the unmasked SC differs
        assert not torch.allclose(sc(x), masked(x), atol=1e-3)
    assert report.kept_fraction >= report.contiguous_fraction
    if method == "contiguous":
        assert report.kept_fraction == report.contiguous_fraction
    assert set(report.kept_by_layer) == {layer.name for layer in wrn_channel_graph(sc).layers}
    build_model(name, conv="gc", groups=4, num_classes=10, **kwargs).load_state_dict(
        gc.state_dict(), strict=True)


def test_converted_gc2l_equals_converted_gc_and_loads_strictly():
    name, kwargs = WRN_CIFAR
    sc = _sc_wrn(name, **kwargs)
    gc, gc_report = convert_to_grouped(sc, conv="gc", groups=4, model_name=name,
                                       model_kwargs=kwargs, seed=5)
    gc2l, gc2l_report = convert_to_grouped(sc, conv="gc2l", groups=4, model_name=name,
                                           model_kwargs=kwargs, seed=5)
    assert gc2l_report.kept_fraction == gc_report.kept_fraction
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gc2l.eval()(x), gc.eval()(x), rtol=1e-5, atol=1e-5)
    coarse = [m.coarse_weight for m in gc2l.modules() if hasattr(m, "coarse_weight")]
    assert coarse and all(not w.any() for w in coarse)
    build_model(name, conv="gc2l", groups=4, num_classes=10, **kwargs).load_state_dict(
        gc2l.state_dict(), strict=True)


def test_converted_imagenet_wrn_equals_its_masked_sc():
    kwargs = dict(depth=18, widen=1)
    sc = _sc_wrn("wrn_imagenet", **kwargs)
    gc, report = convert_to_grouped(sc, conv="gc", groups=8, model_name="wrn_imagenet",
                                    model_kwargs=kwargs)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gc.eval()(x), _block_diagonal_masked(sc, report.partitions)(x),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ errors

def test_conversion_errors():
    name, kwargs = WRN_CIFAR
    sc = _sc_wrn(name, **kwargs)
    with pytest.raises(ConfigError, match="groups=3 does not divide channel space 'stem'"):
        convert_to_grouped(sc, conv="gc", groups=3, model_name=name, model_kwargs=kwargs)
    gc_built = build_model(name, conv="gc", groups=2, **kwargs)
    with pytest.raises(ConfigError, match="conv=sc"):
        convert_to_grouped(gc_built, conv="gc", groups=2, model_name=name, model_kwargs=kwargs)
    with pytest.raises(ConfigError, match="conv=sc"):
        wrn_channel_graph(build_model("mobilenet_v2", num_classes=10))
    with pytest.raises(ConfigError, match="model_kwargs"):
        convert_to_grouped(sc, conv="gc", groups=2, model_name=name,
                           model_kwargs=dict(depth=10, widen=4))
    with pytest.raises(ConfigError, match="model_kwargs"):
        convert_to_grouped(sc, conv="gc", groups=2, model_name=name,
                           model_kwargs=dict(depth=16, widen=2))
    with pytest.raises(ConfigError, match="conv must be one of"):
        convert_to_grouped(sc, conv="sc", groups=2, model_name=name, model_kwargs=kwargs)
    with pytest.raises(ConfigError, match="method must be one of"):
        convert_to_grouped(sc, conv="gc", groups=2, method="random", model_name=name,
                           model_kwargs=kwargs)
    graph = wrn_channel_graph(sc)
    unbalanced = dict(contiguous_partitions(graph, 2), stem=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ConfigError, match="'stem' is not balanced"):
        check_partitions(graph, unbalanced, 2)
