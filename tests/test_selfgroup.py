"""SG-CNN's self-grouping: importance, k-means, the pruning step, the layers' two modes and the
accounting, on hand-built weights whose answers are worked out here."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import GroupConv2d
from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.selfgroup.accounting import layer_report, markdown_table, totals
from twolevel_dist.selfgroup.grouping import (
    kept_channels,
    percentile,
    progressive_schedule,
    prune_step,
)
from twolevel_dist.selfgroup.importance import importance_vectors
from twolevel_dist.selfgroup.kmeans import kmeans
from twolevel_dist.selfgroup.layers import (
    SelfGroupedConv2d,
    SelfGroupedLinear,
    self_group_model,
    self_grouped_layers,
    set_mode,
)

WRN = dict(conv="sc", groups=1, depth=10, widen=2, num_classes=10)


def _conv_with_importance(importance: list[list[float]], kernel: int = 1) -> SelfGroupedConv2d:
    """A conv whose importance vectors are ``importance``: each kernel slice spreads the value
    over its k^2 taps with alternating signs (so only the L1 norm gives it back)."""
    table = torch.tensor(importance)
    out_channels, in_channels = table.shape
    layer = SelfGroupedConv2d(in_channels, out_channels, kernel)
    signs = torch.tensor([(-1.0) ** t for t in range(kernel * kernel)]).view(kernel, kernel)
    with torch.no_grad():
        layer.weight.copy_(table[:, :, None, None] / kernel ** 2 * signs)
    return layer


def _two_layer_model() -> nn.Sequential:
    # Layer A (1x1): filters 0, 1 lean on channels 0, 1; filters 2, 3 on channels 2, 3.
    a = _conv_with_importance([[8, 6, 1, 1], [8, 6, 1, 1], [1, 1, 6, 8], [1, 1, 6, 8]])
    # Layer B (3x3), two filters, so with two groups each filter is its own group. Its
    # importance is 9x the per-weight magnitude the global threshold compares.
    b = _conv_with_importance([[45, 18, 4.5, 4.5], [4.5, 4.5, 18, 63]], kernel=3)
    return nn.Sequential(a, b)


def _random_layer_pair(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(SelfGroupedConv2d(12, 16, 3), SelfGroupedConv2d(16, 24, 3))
    for layer in model:
        nn.init.normal_(layer.weight)
    return model


# --- importance and k-means ------------------------------------------------------------------

def test_importance_vectors_of_hand_built_conv_and_linear_weights():
    weight = torch.zeros(2, 2, 3, 3)
    weight[0, 0] = 1.0                                               # 9 taps of 1 -> 9
    weight[0, 1] = torch.tensor([[-1.0, 0, 2], [0, 0, 0], [0, 0, -3]])  # 1 + 2 + 3 -> 6
    weight[1, 0, 1, 1] = -0.5                                         # -> 0.5
    weight[1, 1] = -2.0                                               # 9 x 2 -> 18
    torch.testing.assert_close(importance_vectors(weight), torch.tensor([[9.0, 6], [0.5, 18]]))
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(importance_vectors(weight, mask),
                               torch.tensor([[9.0, 0], [0.5, 18]]))
    linear = torch.tensor([[1.0, -2, 0], [-3, 0.5, 4]])
    torch.testing.assert_close(importance_vectors(linear), linear.abs())
    torch.testing.assert_close(importance_vectors(linear, torch.tensor([[1, 0, 1], [0, 1, 1]])),
                               torch.tensor([[1.0, 0, 0], [0, 0.5, 4]]))


def test_kmeans_is_deterministic_and_recovers_obvious_clusters():
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0, 10], [10, 0, 0], [0, 10, 0]])
    truth = torch.arange(3).repeat_interleave(5)
    points = centres[truth] + 0.1 * torch.randn(15, 3, generator=generator)
    first, second = kmeans(points, 3, seed=7), kmeans(points, 3, seed=7)
    assert torch.equal(first.labels, second.labels)
    torch.testing.assert_close(first.centroids, second.centroids)
    same_truth = truth[:, None] == truth[None, :]
    same_label = first.labels[:, None] == first.labels[None, :]
    assert torch.equal(same_truth, same_label)
    for cluster in range(3):
        torch.testing.assert_close(first.centroids[first.labels[truth == cluster][0]],
                                   points[truth == cluster].mean(0), rtol=1e-5, atol=1e-5)


def test_percentile_interpolates_like_numpy():
    values = torch.tensor([4.0, 1, 3, 2])
    assert percentile(values, 0.5) == pytest.approx(2.5)
    assert percentile(values, 0.25) == pytest.approx(1.75)     # position 0.75 between 1 and 2
    random = torch.rand(101, generator=torch.Generator().manual_seed(0))
    for q in (0.1, 0.37, 0.9):
        assert percentile(random, q) == pytest.approx(float(np.percentile(random.numpy(), 100 * q)))


def test_global_threshold_compares_connections_per_weight_across_kernel_sizes():
    # The same per-weight magnitudes in a 1x1 and a 3x3 layer: a global step prunes both
    # alike (on raw L1 importance the 1x1 layer would lose everything to the 3x3 one).
    one = _conv_with_importance([[1, 2, 3, 4]] * 2)
    three = _conv_with_importance([[9, 18, 27, 36]] * 2, kernel=3)
    prune_step(nn.Sequential(one, three), sparsity=0.5, groups=1, seed=0)
    assert one.mask.tolist() == three.mask.tolist() == [[False, False, True, True]] * 2


def test_kept_channels_guard_keeps_the_best_channel_of_an_empty_group():
    centroids = torch.tensor([[3.0, 0.5, 2.0], [0.2, 0.4, 0.1]])
    expected = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(kept_channels(centroids, 1.0), expected)


# --- the pruning step -------------------------------------------------------------------------

def test_prune_step_on_hand_built_layers_keeps_the_expected_channels():
    model = _two_layer_model()
    a, b = model
    summary = prune_step(model, sparsity=0.5, groups=2, seed=0)
    # 24 entries: four 0.5, eight 1, two 2, 5, four 6, 7, four 8. Position 0.5 * 23 = 11.5 lies
    # between the last 1 and the first 2: threshold 1.5, and exactly 12 entries are <= 1.5.
    assert summary.threshold == pytest.approx(1.5, abs=1e-5)
    assert summary.pruned_fraction == pytest.approx(0.5)
    groups = a.filter_group.tolist()
    assert groups[0] == groups[1] != groups[2] == groups[3]
    assert b.filter_group[0] != b.filter_group[1]
    low, high = [True, True, False, False], [False, False, True, True]
    assert a.mask.tolist() == [low, low, high, high]
    assert b.mask.tolist() == [low, high]
    assert torch.all(a.weight[~a.mask] == 0) and torch.all(b.weight[~b.mask] == 0)
    assert [layer.kept_fraction for layer in summary.layers] == [0.5, 0.5]

    before = [a.mask.clone(), b.mask.clone()]
    summary = prune_step(model, sparsity=0.75, groups=2, seed=0)
    # Now 12 zeros (pruned), then 2, 2, 5, four 6, 7, four 8. Position 0.75 * 23 = 17.25 lies
    # between two 6s: threshold 6. A's groups keep their 8s; B's second filter keeps its 7 and
    # its first filter (5, 2: nothing above 6) keeps its most important channel by the guard.
    assert summary.threshold == pytest.approx(6.0)
    assert a.mask.tolist() == [[True, False, False, False]] * 2 + [[False, False, False, True]] * 2
    assert b.mask.tolist() == [[True, False, False, False], [False, False, False, True]]
    assert summary.pruned_fraction == pytest.approx(0.75)
    for old, layer in zip(before, model):
        assert not torch.any(layer.mask & ~old)                   # masks only shrink


def test_a_filter_never_regains_a_connection_its_group_keeps():
    layer = _conv_with_importance([[4, 4, 1], [4, 4, 1]])
    layer.apply_grouping(torch.zeros(2, dtype=torch.long),
                         torch.tensor([[True, True, True], [True, False, True]]))
    # One group, centroid (4, 2, 1); entries 4 2 1 | 4 0 1: threshold at position 2.5 is 1.5.
    summary = prune_step(nn.Sequential(layer), sparsity=0.5, groups=1)
    assert summary.threshold == pytest.approx(1.5)
    assert layer.mask.tolist() == [[True, True, False], [True, False, False]]
    assert summary.pruned_fraction == pytest.approx(0.5)


def test_prune_step_reaches_the_target_within_a_group_and_only_shrinks_masks():
    model = _random_layer_pair()
    total = sum(layer.mask.numel() for layer in model)
    previous = [layer.mask.clone() for layer in model]
    for sparsity in (0.3, 0.6, 0.95):
        summary = prune_step(model, sparsity=sparsity, groups=4, seed=3)
        kept = sum(layer.kept_connections() for layer in model)
        assert summary.pruned_fraction == pytest.approx(1 - kept / total)
        largest_group = max(max(layer.group_sizes()) for layer in model)
        if sparsity < 0.9:   # at 0.95 the guard may keep more than the target
            assert abs(summary.pruned_fraction - sparsity) <= largest_group / total
        for old, layer in zip(previous, model):
            assert not torch.any(layer.mask & ~old)
            for group in layer.filter_group.unique():
                rows = layer.mask[layer.filter_group == group]
                assert rows.any(), "every group keeps at least one input channel"
                # SG pruning leaves the filters of a group with the same channels
                assert torch.equal(rows, rows[:1].expand_as(rows))
        previous = [layer.mask.clone() for layer in model]


def test_prune_step_is_deterministic_for_a_seed():
    first, second = _random_layer_pair(), _random_layer_pair()
    prune_step(first, sparsity=0.4, groups=3, seed=11)
    prune_step(second, sparsity=0.4, groups=3, seed=11)
    for x, y in zip(first, second):
        assert torch.equal(x.mask, y.mask) and torch.equal(x.filter_group, y.filter_group)


def test_layer_scope_prunes_each_layer_to_the_target():
    model = _random_layer_pair()
    summary = prune_step(model, sparsity=0.5, groups=2, seed=0, scope="layer")
    assert summary.threshold is None
    for row, layer in zip(summary.layers, model):
        assert abs(row.kept_fraction - 0.5) <= max(layer.group_sizes()) / layer.mask.numel()


def test_progressive_schedule():
    assert progressive_schedule(0.5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert progressive_schedule(0.55) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.55])
    assert progressive_schedule(0.05) == [0.05]
    assert progressive_schedule(0.6, step=0.3) == pytest.approx([0.3, 0.6])


# --- the layers' two modes --------------------------------------------------------------------

def _random_grouping(layer, generator) -> None:
    """Unequal, overlapping groups with non-contiguous ids: sizes 2, 1, 3, 1; the size-1 group
    with id 1 has no kept input; one filter of group 2 keeps fewer channels than the others."""
    groups = torch.tensor([2, 0, 2, 5, 0, 2, 1])
    channels = {0: [0, 1, 2], 1: [], 2: [1, 2, 3, 4, 5], 5: [0, 5]}
    mask = torch.zeros(7, 6, dtype=torch.bool)
    for filter_index, group in enumerate(groups.tolist()):
        mask[filter_index, channels[group]] = True
    mask[5, 4] = False
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    layer.apply_grouping(groups, mask)


def _outputs_and_grads(layer, x, probe, mode):
    layer.mode = mode
    layer.zero_grad()
    out = layer(x)
    (out * probe).sum().backward()
    return out.detach(), layer.weight.grad.clone()


@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_masked_and_compact_conv_agree(kernel, stride):
    generator = torch.Generator().manual_seed(kernel * 10 + stride)
    layer = SelfGroupedConv2d(6, 7, kernel, stride)
    _random_grouping(layer, generator)
    x = torch.randn(2, 6, 7, 7, generator=generator)
    probe = torch.randn(layer(x).shape, generator=generator)
    masked = _outputs_and_grads(layer, x, probe, "masked")
    compact = _outputs_and_grads(layer, x, probe, "compact")
    torch.testing.assert_close(masked[0], compact[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[1], compact[1], rtol=1e-5, atol=1e-5)
    assert torch.all(compact[0][:, 6] == 0)          # the group with no kept input
    for _, grad in (masked, compact):
        assert torch.all(grad[~layer.mask] == 0)


@pytest.mark.parametrize("shape", [(3, 6), (2, 4, 6)])
def test_masked_and_compact_linear_agree(shape):
    generator = torch.Generator().manual_seed(len(shape))
    layer = SelfGroupedLinear(6, 7)
    _random_grouping(layer, generator)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(7, generator=generator))
    x = torch.randn(shape, generator=generator)
    probe = torch.randn(*shape[:-1], 7, generator=generator)
    masked = _outputs_and_grads(layer, x, probe, "masked")
    compact = _outputs_and_grads(layer, x, probe, "compact")
    torch.testing.assert_close(masked[0], compact[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[1], compact[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compact[0][..., 6], layer.bias[6].detach().expand(shape[:-1]))
    assert torch.all(compact[1][~layer.mask] == 0)


@pytest.mark.parametrize("make", [lambda: SelfGroupedConv2d(6, 7, 3),
                                  lambda: SelfGroupedLinear(6, 7)])
def test_a_pruned_connection_is_never_used(make):
    generator = torch.Generator().manual_seed(5)
    layer = make()
    _random_grouping(layer, generator)
    x = torch.randn((2, 6, 5, 5) if layer.weight.dim() == 4 else (2, 6), generator=generator)
    before = {mode: _outputs_and_grads(layer, x, 1.0, mode)[0] for mode in ("masked", "compact")}
    with torch.no_grad():
        pruned = ~layer.mask
        layer.weight[pruned] = 1e3 * torch.randn(layer.weight[pruned].shape, generator=generator)
    for mode in ("masked", "compact"):
        out, grad = _outputs_and_grads(layer, x, 1.0, mode)
        torch.testing.assert_close(out, before[mode])
        assert torch.all(grad[pruned] == 0)


def test_compact_plan_follows_a_new_grouping():
    generator = torch.Generator().manual_seed(2)
    layer = SelfGroupedConv2d(6, 7, 3)
    nn.init.normal_(layer.weight, generator=generator)
    x = torch.randn(1, 6, 5, 5, generator=generator)
    layer.mode = "compact"
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, layer.weight, padding=1))
    _random_grouping(layer, generator)                   # in-place buffer writes
    with torch.no_grad():                                # so a stale (dense) plan would show
        layer.weight[~layer.mask] = 10.0
    compact = layer(x)
    layer.mode = "masked"
    torch.testing.assert_close(compact, layer(x), rtol=1e-5, atol=1e-5)


# --- whole models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wrn_pruned():
    """(an SC WRN-10-2, its self-grouped copy pruned once at 0.5 with 4 groups, an input)."""
    torch.manual_seed(0)
    sc = build_model("wrn", **WRN).eval()
    x = torch.randn(2, 3, 32, 32)
    grouped = self_group_model(copy.deepcopy(sc))
    torch.testing.assert_close(grouped(x), sc(x))        # conversion leaves outputs unchanged
    prune_step(grouped, sparsity=0.5, groups=4, seed=0)
    return sc, grouped, x


def test_self_group_model_replaces_sc_convs_and_the_head(wrn_pruned):
    sc, grouped, _ = wrn_pruned
    sc_names = [n for n, m in sc.named_modules() if getattr(m, "kind", None) == "sc"]
    layers = dict(self_grouped_layers(grouped))
    assert sorted(layers) == sorted(sc_names + ["fc"])
    assert isinstance(layers["fc"], SelfGroupedLinear)
    assert type(grouped.stem[0]) is type(sc.stem[0])     # the stem is never grouped


def test_pruned_wrn_accounting_is_consistent(wrn_pruned):
    sc, grouped, _ = wrn_pruned
    assert count_parameters(grouped) < count_parameters(sc)
    spatial = {"stages.0": 32, "stages.1": 16, "stages.2": 8}
    layers = dict(self_grouped_layers(grouped))
    rows = layer_report(grouped)
    assert [r.name for r in rows] == list(layers)
    for row in rows:
        layer = layers[row.name]
        k2 = row.kernel ** 2
        bias = 0 if row.kind == "conv" else row.out_channels
        kept_weights = 0
        for group in layer.filter_group.unique():
            members = layer.filter_group == group
            channels = int(layer.mask[members].any(0).sum())
            kept_weights += int(members.sum()) * channels * k2
        assert row.kept_params == kept_weights + bias
        assert row.dense_params == row.out_channels * row.in_channels * k2 + bias
        assert sum(row.group_sizes) == row.out_channels and len(row.group_sizes) == row.groups
        side = 1 if row.kind == "linear" else spatial[row.name[:8]]
        assert row.kept_macs == kept_weights * side * side
        assert row.dense_macs == row.out_channels * row.in_channels * k2 * side * side
    whole = totals(grouped)
    assert whole.kept_params == count_parameters(grouped)
    assert whole.dense_params == sum(p.numel() for p in sc.parameters())
    stem_macs = 16 * 3 * 9 * 32 * 32
    assert whole.dense_macs == stem_macs + sum(r.dense_macs for r in rows)
    assert whole.kept_macs == stem_macs + sum(r.kept_macs for r in rows)
    assert whole.mac_compression > 1 and whole.param_compression > 1
    assert grouped.training is False                     # restored (the fixture is in eval mode)
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "stages.0.0.conv1" in table


def test_pruned_wrn_compact_matches_masked_and_round_trips(wrn_pruned):
    _, grouped, x = wrn_pruned
    model = copy.deepcopy(grouped)
    masked = model(x)
    compact = set_mode(model, "compact")(x)
    torch.testing.assert_close(compact, masked, rtol=1e-4, atol=1e-5)

    fresh = self_group_model(build_model("wrn", **WRN)).eval()
    set_mode(fresh, "compact")
    fresh(x)                                 # a compact plan for the unpruned grouping exists
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():                    # a plan not rebuilt after loading would read these
        for _, layer in self_grouped_layers(fresh):
            layer.weight[~layer.mask] = 5.0
    torch.testing.assert_close(fresh(x), compact, rtol=1e-5, atol=1e-6)
    for (_, a), (_, b) in zip(self_grouped_layers(fresh), self_grouped_layers(model)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.filter_group, b.filter_group)


# --- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5, True, "0.5"])
def test_bad_sparsity_raises(sparsity):
    with pytest.raises(ConfigError, match="sparsity"):
        prune_step(_random_layer_pair(), sparsity=sparsity, groups=2)


@pytest.mark.parametrize("groups", [0, -1, 17, 2.0])
def test_bad_groups_raise(groups):
    with pytest.raises(ConfigError, match="groups"):
        prune_step(_random_layer_pair(), sparsity=0.5, groups=groups)


def test_other_bad_inputs_raise():
    with pytest.raises(ConfigError, match="mode"):
        set_mode(_random_layer_pair(), "sparse")
    with pytest.raises(ConfigError, match="mode"):
        SelfGroupedLinear(3, 2).mode = "dense"
    with pytest.raises(ConfigError, match="conv='sc'"):
        self_group_model(build_model("wrn", conv="gc", groups=2, depth=10, widen=1))
    with pytest.raises(ConfigError, match="groups=1"):
        SelfGroupedConv2d.from_conv(GroupConv2d(4, 4, 3, 1, 2))
    with pytest.raises(ConfigError, match="self_group_model"):
        prune_step(nn.Sequential(nn.Conv2d(2, 2, 1)), sparsity=0.5, groups=1)
    with pytest.raises(ConfigError, match="scope"):
        prune_step(_random_layer_pair(), sparsity=0.5, groups=2, scope="per-group")
    for target, step in ((0, 0.1), (1, 0.1), (0.5, 0), (0.5, -0.1)):
        with pytest.raises(ConfigError):
            progressive_schedule(target, step)
