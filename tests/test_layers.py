"""Each convolution kind against a direct computation written here with torch.nn.functional."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import CONV_KINDS, make_conv, straight_through_one_hot
from twolevel_dist.layers.taps import InputGradSum, local_convolution, representatives_taps
from twolevel_dist.layers.two_level import TwoLevelGroupConv2d

torch.manual_seed(0)
KINDS = sorted(CONV_KINDS)


def _groups_for(kind, groups):
    return 1 if kind == "sc" else groups


@pytest.mark.parametrize("impl", ["fused", "taps"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1), (1, 2), (5, 1)])
def test_gc2l_equals_group_conv_plus_coarse_1x1_of_representatives(kernel, stride, impl):
    n, cin, cout = 4, 8, 12
    layer = make_conv("gc2l", cin, cout, kernel, stride, n)
    layer.impl = impl
    x = torch.randn(3, cin, 9, 9)
    g = cout // n
    local_w = layer.weight[:, :g].reshape(cout, cin // n, kernel, kernel)   # GC filters
    rep_w = layer.weight[:, g].reshape(n, cin // n, kernel, kernel)          # R0: C_in -> N
    a0 = layer.coarse_weight.reshape(cout, n, 1, 1)                         # A0: 1x1 N -> C_out
    gc = F.conv2d(x, local_w, stride=stride, padding=kernel // 2, groups=n)
    r0 = F.conv2d(x, rep_w, stride=stride, padding=kernel // 2, groups=n)
    expected = gc + F.conv2d(r0, a0)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous()           # what BatchNorm after it wants
    out.square().sum().backward()        # both paths give the same gradients
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.impl = "taps" if impl == "fused" else "fused"
    layer(x).square().sum().backward()
    for a, b in zip(grads, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gc2l_with_zero_coarse_operator_is_gc():
    n, cin, cout, k = 4, 8, 16, 3
    gc2l = make_conv("gc2l", cin, cout, k, 1, n)
    gc = make_conv("gc", cin, cout, k, 1, n)
    with torch.no_grad():
        gc2l.coarse_weight.zero_()
        gc.weight.copy_(gc2l.weight[:, : cout // n].reshape_as(gc.weight))
    x = torch.randn(2, cin, 7, 7)
    torch.testing.assert_close(gc2l(x), gc(x), rtol=1e-5, atol=1e-6)


@pytest.mark.shipped_init
@pytest.mark.parametrize("impl", ["fused", "taps"])
def test_a_fresh_gc2l_layer_is_its_gc_and_its_coarse_level_learns_from_there(impl):
    n, cin, cout, k = 4, 8, 16, 3
    gc2l = make_conv("gc2l", cin, cout, k, 1, n)
    gc2l.impl = impl
    gc = make_conv("gc", cin, cout, k, 1, n)
    with torch.no_grad():
        gc.weight.copy_(gc2l.weight[:, : cout // n].reshape_as(gc.weight))
    x = torch.randn(2, cin, 7, 7)
    assert torch.equal(gc2l.coarse_weight, torch.zeros(cout, n))
    torch.testing.assert_close(gc2l(x), gc(x), rtol=1e-5, atol=1e-6)
    # A0 = 0 must not be a fixed point: A0 learns at the first step (the representatives are
    # not zero), the representative filters at the second (A0 no longer is).
    optimizer = torch.optim.SGD(gc2l.parameters(), lr=0.1)
    representatives = gc2l.weight[:, cout // n].detach().clone()
    target = torch.randn(2, cout, 7, 7)
    for step in (1, 2):
        optimizer.zero_grad()
        (gc2l(x) - target).square().mean().backward()
        optimizer.step()
        moved = not torch.equal(gc2l.weight[:, cout // n], representatives)
        assert moved == (step == 2)
    assert gc2l.coarse_weight.abs().min() > 0


def test_gc_and_sc_match_functional_conv():
    x = torch.randn(2, 8, 7, 7)
    gc = make_conv("gc", 8, 16, 3, 2, 4)
    torch.testing.assert_close(gc(x), F.conv2d(x, gc.weight, stride=2, padding=1, groups=4))
    sc = make_conv("sc", 8, 16, 3, 1, 1)
    torch.testing.assert_close(sc(x), F.conv2d(x, sc.weight, padding=1))
    assert gc.weight.shape == (16, 2, 3, 3) and sc.weight.shape == (16, 8, 3, 3)


def test_shuffle_is_gc_then_channel_shuffle():
    n, cout = 4, 16
    layer = make_conv("shuffle", 8, cout, 3, 1, n)
    x = torch.randn(2, 8, 5, 5)
    gc_out = F.conv2d(x, layer.weight, padding=1, groups=n)
    # Output channel a*N + b comes from GC channel b*(C/N) + a (ShuffleNet's definition).
    order = [b * (cout // n) + a for a in range(cout // n) for b in range(n)]
    torch.testing.assert_close(layer(x), gc_out[:, order])
    torch.testing.assert_close(layer(x), torch.nn.ChannelShuffle(n)(gc_out))


def test_flgc_is_dense_conv_masked_by_shared_group_membership():
    layer = make_conv("flgc", 8, 12, 3, 1, 4)
    x = torch.randn(2, 8, 6, 6)
    in_group = layer.in_assign_logits.argmax(1)
    out_group = layer.out_assign_logits.argmax(1)
    mask = (out_group[:, None] == in_group[None, :]).float()
    expected = F.conv2d(x, layer.weight * mask[:, :, None, None], padding=1)
    torch.testing.assert_close(layer(x), expected)
    # Balanced at initialisation: every group holds C/N input channels and C/N filters.
    assert torch.bincount(in_group, minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.bincount(out_group, minlength=4).tolist() == [3, 3, 3, 3]


def test_straight_through_one_hot_is_hard_forward_soft_backward():
    logits = torch.tensor([[2.0, 0.0, 1.0]], requires_grad=True)
    hard = straight_through_one_hot(logits)
    assert hard.tolist() == [[1.0, 0.0, 0.0]]
    (hard * torch.tensor([[0.0, 1.0, 0.0]])).sum().backward()
    soft = logits.detach().softmax(-1)[0]
    expected = -soft[1] * soft + torch.eye(3)[1] * soft[1]   # d softmax_1 / d logits
    torch.testing.assert_close(logits.grad[0], expected)


def test_flgc_assignment_logits_get_gradients_and_change_under_training():
    torch.manual_seed(1)
    layer = make_conv("flgc", 8, 8, 3, 1, 2)
    before_in = layer.in_assign_logits.detach().clone()
    before_out = layer.out_assign_logits.detach().clone()
    x, target = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(5):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        if step == 0:
            assert layer.in_assign_logits.grad.abs().sum() > 0
            assert layer.out_assign_logits.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(layer.in_assign_logits.detach(), before_in)
    assert not torch.equal(layer.out_assign_logits.detach(), before_out)


def _coupling(kind, n=4, cin=8, cout=16, k=3):
    """|d output of channel block 0 / d input of channel blocks 1..N-1|: zero iff groups are
    isolated from each other."""
    torch.manual_seed(2)
    layer = make_conv(kind, cin, cout, k, 1, _groups_for(kind, n))
    x = torch.randn(2, cin, 6, 6, requires_grad=True)
    layer(x)[:, : cout // n].sum().backward()
    return x.grad[:, cin // n:].abs().sum().item()


def test_gc_groups_never_talk():
    assert _coupling("gc") == 0.0


@pytest.mark.parametrize("kind", ["gc2l", "shuffle", "flgc", "sc"])
def test_other_kinds_couple_groups(kind):
    assert _coupling(kind) > 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel,stride,size,expected", [(3, 1, 8, 8), (3, 2, 8, 4), (1, 2, 9, 5),
                                                         (5, 2, 9, 5)])
def test_shapes_and_strides(kind, kernel, stride, size, expected):
    layer = make_conv(kind, 8, 16, kernel, stride, _groups_for(kind, 4))
    y = layer(torch.randn(2, 8, size, size))
    assert y.shape == (2, 16, expected, expected)


def test_gc2l_fused_layout_shapes():
    layer = make_conv("gc2l", 8, 16, 3, 1, 4)
    assert layer.weight.shape == (4, 16 // 4 + 1, 8 // 4, 3, 3)
    assert layer.coarse_weight.shape == (16, 4)
    n_params = sum(p.numel() for p in layer.parameters())
    # DESIGN.md: C_in C_out k^2/N + C_in k^2 + N C_out
    assert n_params == 8 * 16 * 9 // 4 + 8 * 9 + 4 * 16


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="gc", in_channels=6, out_channels=16, kernel_size=3, groups=4), "must divide"),
    (dict(kind="gc2l", in_channels=8, out_channels=10, kernel_size=3, groups=4), "must divide"),
    (dict(kind="gc", in_channels=8, out_channels=16, kernel_size=2, groups=4), "odd"),
    (dict(kind="gc", in_channels=8, out_channels=16, kernel_size=3, groups=0), "positive"),
    (dict(kind="gc2l", in_channels=0, out_channels=16, kernel_size=3, groups=1), "positive"),
    (dict(kind="gc", in_channels=8, out_channels=16, kernel_size=3, stride=0), "positive"),
    (dict(kind="gc", in_channels=8.0, out_channels=16, kernel_size=3), "positive integer"),
    (dict(kind="sc", in_channels=8, out_channels=16, kernel_size=3, groups=2), "no groups"),
    (dict(kind="conv", in_channels=8, out_channels=16, kernel_size=3), "unknown convolution"),
    (dict(kind="flgc", in_channels=8, out_channels=12, kernel_size=3, groups=8), "must divide"),
    (dict(kind="shuffle", in_channels=8, out_channels=16, kernel_size=4, groups=2), "odd"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_conv(**kwargs)


def test_gc2l_rejects_an_unknown_implementation():
    from twolevel_dist.layers import TwoLevelGroupConv2d
    with pytest.raises(ConfigError, match="impl must be one of"):
        TwoLevelGroupConv2d(8, 8, 3, 1, 2, impl="winograd")


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 7), (3, 2, 8), (1, 2, 7), (5, 1, 6)])
def test_representatives_by_taps_match_a_grouped_convolution_and_its_gradients(kernel, stride,
                                                                                size):
    groups, per_group = 3, 2
    x = torch.randn(2, groups * per_group, size, size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(groups, per_group, kernel, kernel, dtype=torch.float64,
                         requires_grad=True)
    expected = F.conv2d(x, weight, None, stride, kernel // 2, 1, groups)
    torch.testing.assert_close(representatives_taps(x, weight, stride, kernel // 2), expected)
    assert torch.autograd.gradcheck(
        lambda a, b: representatives_taps(a, b, stride, kernel // 2), (x, weight),
        fast_mode=True)
    # channels_last input: the same numbers
    x_cl = x.detach().to(memory_format=torch.channels_last)
    torch.testing.assert_close(representatives_taps(x_cl, weight, stride, kernel // 2), expected)


def test_representatives_by_taps_under_bfloat16_autocast():
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = representatives_taps(x, weight, 1, 1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    expected = F.conv2d(x.detach(), weight.detach(), None, 1, 1, 1, 4)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=1e-1)


@pytest.mark.parametrize("first", ["local", "representatives"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_two_x_gradients_meet_in_either_order(first, layout):
    # Separate backward calls force the order: the first parks its x-gradient (x.grad stays
    # empty), the second returns the sum, which must equal autograd's own sum of the two.
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    local_weight = torch.randn(9, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    rep_weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_sum = InputGradSum()
    outputs = {"local": local_convolution(x, local_weight, 2, 1, 3, grad_sum),
               "representatives": representatives_taps(x, rep_weight, 2, 1, grad_sum)}
    grads = {name: torch.randn_like(out) for name, out in outputs.items()}
    second = "representatives" if first == "local" else "local"
    outputs[first].backward(grads[first])
    assert x.grad is None
    outputs[second].backward(grads[second])
    expected = (F.conv2d(x, local_weight, None, 2, 1, 1, 3),
                F.conv2d(x, rep_weight, None, 2, 1, 1, 3))
    grad_x, grad_local, grad_rep = torch.autograd.grad(
        expected, (x, local_weight, rep_weight), (grads["local"], grads["representatives"]))
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(local_weight.grad, grad_local)
    torch.testing.assert_close(rep_weight.grad, grad_rep)


@pytest.mark.parametrize("impl", ["taps", "fused"])
@pytest.mark.parametrize("groups,stride,kernel", [(2, 1, 3), (4, 2, 3), (1, 1, 3), (2, 2, 1)])
def test_gc2l_layer_in_channels_last_equals_nchw(groups, stride, kernel, impl):
    # The coarse level has its own channels-last code (pixels as matrix rows): same outputs and
    # gradients as on NCHW, and the output stays channels-last, as the convolution's would, on
    # both paths (the fused one is the GPU default).
    layer = TwoLevelGroupConv2d(8, 8, kernel, stride, groups, impl=impl).double()
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    out = layer(x)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (x, *layer.parameters()), grad)
    out_cl = layer(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)
    for got, want in zip(torch.autograd.grad(out_cl, (x_cl, *layer.parameters()), grad),
                         expected):
        torch.testing.assert_close(got, want)


def test_gc2l_taps_layer_with_frozen_weights_still_passes_the_input_gradient():
    # A frozen layer (fine-tuning what comes before it): no weight gradient is asked for.
    layer = TwoLevelGroupConv2d(8, 8, 3, 1, 2, impl="taps").double().requires_grad_(False)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference = TwoLevelGroupConv2d(8, 8, 3, 1, 2, impl="fused").double().requires_grad_(False)
    reference.load_state_dict(layer.state_dict())
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.weight.grad is None and layer.coarse_weight.grad is None


def test_gc2l_taps_layer_trains_under_bfloat16_autocast():
    # bf16 keeps 8 bits: compare whole tensors against the fp32 run by relative error.
    layer = TwoLevelGroupConv2d(16, 16, 3, 1, 2, impl="taps")
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    low = (out.detach().float(), x.grad, layer.weight.grad, layer.coarse_weight.grad)
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    layer.zero_grad()
    expected = layer(x_ref)
    expected.square().sum().backward()
    for got, want in zip(low, (expected.detach(), x_ref.grad, layer.weight.grad,
                               layer.coarse_weight.grad)):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_representatives_by_taps_on_every_small_geometry(layout):
    # Edge cases of the tap windows: taps that fall wholly in the padding, 1x1 images, strides
    # larger than the kernel; in both layouts, which R0 reads each in its own way.
    checked = 0
    for kernel, stride, size in itertools.product([1, 3, 5], [1, 2, 3], range(1, 10)):
        for padding in sorted({0, kernel // 2}):
            if size + 2 * padding < kernel:
                continue
            x = torch.randn(2, 6, size, size, dtype=torch.float64).to(memory_format=layout)
            x.requires_grad_()
            weight = torch.randn(3, 2, kernel, kernel, dtype=torch.float64, requires_grad=True)
            expected = F.conv2d(x, weight, None, stride, padding, 1, 3)
            got = representatives_taps(x, weight, stride, padding)
            torch.testing.assert_close(got, expected)
            grad = torch.randn_like(expected)
            for a, b in zip(torch.autograd.grad(got, (x, weight), grad),
                            torch.autograd.grad(expected, (x, weight), grad)):
                torch.testing.assert_close(a, b)
            checked += 1
    assert checked == 117


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_coarse_weights_gradient_is_laid_out_as_the_weight(groups, channels_last):
    """A0's gradient [C_out, N] has A0's own strides and dtype (DDP copies any other layout into
    its bucket the slow way, warning every step), [C_out, 1] included."""
    from twolevel_dist.layers.coarse import coarse_weight_grad
    layout = torch.channels_last if channels_last else torch.contiguous_format
    grad = torch.randn(2, 8, 5, 5).contiguous(memory_format=layout)
    representatives = torch.randn(2, groups, 5, 5)
    coarse_weight = torch.zeros(8, groups, dtype=torch.float64)
    weight_grad = coarse_weight_grad(grad, representatives, coarse_weight)
    assert weight_grad.stride() == coarse_weight.stride() == (groups, 1)
    assert weight_grad.dtype == torch.float64            # the weight's, as under autocast
    expected = torch.einsum("bohw,bnhw->on", grad, representatives)
    torch.testing.assert_close(weight_grad, expected.double(), rtol=1e-5, atol=1e-6)

