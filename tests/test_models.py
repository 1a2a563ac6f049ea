"""Backbones by name: shapes, parameter counts computed by hand, input encoding, bad input."""

import pytest
import torch
from torch import nn

from msgcli.snn import LIF, build_model, list_models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# --- parameter counts, by hand (conv: cin*cout*k*k, no bias; BN: 2*C; FC: in*K + K) ------------


def _conv_bn_chain(in_channels: int, widths: list[int]) -> int:
    """3x3 convolutions without bias, each followed by a BatchNorm (2 parameters per channel)."""
    total = 0
    for width in widths:
        total += in_channels * width * 9 + 2 * width
        in_channels = width
    return total


@pytest.mark.parametrize("name, in_channels, widths, fc_in, expected", [
    ("vggsnn", 2, [64, 128, 256, 256, 512, 512, 512, 512], 512 * 3 * 3, 9_268_746),  # 48 -> 3 after four 2x2 pools
    ("vggsnn_tiny", 2, [32, 64, 128], 128 * 4 * 4, 113_674),  # 32 -> 4 after three pools
    ("cifarnet", 3, [256, 256, 256, 256, 512, 512, 1024, 1024], 1024, 19_489_546),  # global average pool head
])
def test_plain_backbone_parameter_count(name, in_channels, widths, fc_in, expected):
    by_hand = _conv_bn_chain(in_channels, widths) + fc_in * 10 + 10
    assert by_hand == expected
    assert n_params(build_model(name, in_channels=in_channels, num_classes=10, T=4)) == expected


def _basic_stage(cin, c, blocks):
    """First block: two 3x3 convs + 2 BN, and a 1x1 conv + BN shortcut when the shape changes;
    then (blocks - 1) identity blocks of two 3x3 convs + 2 BN."""
    first = cin * c * 9 + c * c * 9 + 2 * (2 * c) + ((cin * c + 2 * c) if cin != c else 0)
    return first + (blocks - 1) * (2 * c * c * 9 + 2 * (2 * c))


def _resnet_count(in_channels, K, depths, stem):
    stem_params = (in_channels * 64 * 7 * 7 if stem == "imagenet" else in_channels * 64 * 3 * 3) + 2 * 64
    stages = (
        _basic_stage(64, 64, depths[0]) + _basic_stage(64, 128, depths[1])
        + _basic_stage(128, 256, depths[2]) + _basic_stage(256, 512, depths[3])
    )
    return stem_params + stages + 512 * K + K


@pytest.mark.parametrize("name, depths", [("resnet18", (2, 2, 2, 2)), ("sew_resnet18", (2, 2, 2, 2)), ("sew_resnet34", (3, 4, 6, 3))])
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet_parameter_counts(name, depths, stem):
    model = build_model(name, in_channels=2, num_classes=10, T=4, stem=stem)
    assert n_params(model) == _resnet_count(2, 10, depths, stem)


def test_resnet_counts_equal_torchvisions_published_totals():
    # torchvision's resnet18 / resnet34 at 3 channels, 1000 classes: 11,689,512 and 21,797,672 parameters;
    # LIF neurons have none, so the spiking (and SEW) versions with the ImageNet stem have the same.
    assert _resnet_count(3, 1000, (2, 2, 2, 2), "imagenet") == 11_689_512
    assert n_params(build_model("resnet18", in_channels=3, num_classes=1000, T=4)) == 11_689_512
    assert n_params(build_model("sew_resnet34", in_channels=3, num_classes=1000, T=4)) == 21_797_672


def test_resnet_stems():
    """resnet18's ImageNet stem is average-pooled as the release's main.py builds it (``ResNet18(pool='avg')``);
    the SEW-ResNets' is max-pooled as the release's sew_resnet; ``stem_pool`` switches either."""
    def stem_pool(model):
        return [type(m) for m in model.stem.modules() if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]

    imagenet = build_model("resnet18", in_channels=2, num_classes=10, T=2, stem="imagenet")
    cifar = build_model("resnet18", in_channels=2, num_classes=10, T=2, stem="cifar")
    conv = first_conv(imagenet)
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2)
    assert stem_pool(imagenet) == [nn.AvgPool2d]
    pool = next(m for m in imagenet.stem.modules() if isinstance(m, nn.AvgPool2d))
    assert (pool.kernel_size, pool.stride, pool.padding, pool.count_include_pad) == (3, 2, 1, True)
    assert stem_pool(build_model("resnet18", in_channels=2, num_classes=10, T=2, stem_pool="max")) == [nn.MaxPool2d]
    assert stem_pool(build_model("sew_resnet18", in_channels=3, num_classes=10, T=2)) == [nn.MaxPool2d]
    assert stem_pool(build_model("sew_resnet34", in_channels=3, num_classes=10, T=2, stem_pool="avg")) == [nn.AvgPool2d]
    conv = first_conv(cifar)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert stem_pool(cifar) == []


# --- shapes -----------------------------------------------------------------------------------

# Small inputs for speed (vggsnn at 48x48 runs in test_release_equivalence.py).
SHAPE_CASES = [
    ("vggsnn", {"input_size": 16}, 2, 16),
    ("vggsnn_tiny", {}, 2, 32),
    ("resnet18", {"stem": "imagenet"}, 2, 16),
    ("resnet18", {"stem": "cifar"}, 3, 8),
    ("cifarnet", {}, 3, 8),
    ("sew_resnet18", {}, 3, 16),
    ("sew_resnet34", {"stem": "cifar"}, 3, 8),
]


@pytest.mark.parametrize("name, options, channels, size", SHAPE_CASES)
def test_output_shapes_for_events_and_images(name, options, channels, size):
    T, B, K = 2, 2, 7
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=K, T=T, **options)
    with torch.no_grad():
        events = model(torch.rand(B, T, channels, size, size) * 3)
        images = model(torch.randn(B, channels, size, size))
    assert events.shape == (T, B, K)
    assert images.shape == (T, B, K)
    # The readout is a current, not spikes.
    assert not set(events.unique().tolist()) <= {0.0, 1.0}


def _active_model(T, in_channels):
    """A small model in training mode: per-step BN batch statistics keep every layer firing at init
    (in eval mode at init the deep layers are silent and the logits are just the classifier bias)."""
    torch.manual_seed(1)
    return build_model("vggsnn_tiny", in_channels=in_channels, num_classes=5, T=T, input_size=16).train()


def test_image_input_is_the_image_repeated_t_times():
    model = _active_model(T=3, in_channels=3)
    image = torch.randn(2, 3, 16, 16) * 2
    with torch.no_grad():
        direct = model(image)
        repeated = model(image.unsqueeze(1).expand(2, 3, 3, 16, 16))
    assert not torch.allclose(direct[:, 0], direct[:, 1])  # the output depends on the sample
    assert torch.equal(direct, repeated)


def test_event_input_is_read_as_batch_then_time():
    """[B, T, C, H, W] clips: sample b at time t is clip[b, t]."""
    model = _active_model(T=3, in_channels=2)
    clip = torch.rand(2, 3, 2, 16, 16) * 3
    with torch.no_grad():
        out = model(clip)
        expected = model.forward_time(torch.stack([clip[:, t] for t in range(3)]))
    assert not torch.allclose(out[:, 0], out[:, 1])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ["vggsnn", "vggsnn_tiny", "cifarnet", "resnet18", "sew_resnet18", "sew_resnet34"])
def test_first_conv_follows_in_channels(name):
    for in_channels in (1, 5):
        model = build_model(name, in_channels=in_channels, num_classes=3, T=2)
        assert first_conv(model).in_channels == in_channels


def test_registry_lists_the_paper_backbones():
    assert {"vggsnn", "vggsnn_tiny", "resnet18", "cifarnet", "sew_resnet18", "sew_resnet34"} <= set(list_models())


def test_neuron_options_reach_every_lif():
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=3, T=2, mask_p=0.3, surrogate="arctan", tau=3.0, reset="soft")
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert len(lifs) == 3
    for lif in lifs:
        assert (lif.mask_p, lif.spec.surrogate, lif.tau, lif.reset) == (0.3, "arctan", 3.0, "soft")


def test_bn_mode_reaches_every_batchnorm():
    from msgcli.snn import TemporalBatchNorm

    model = build_model("resnet18", in_channels=2, num_classes=3, T=2, bn_mode="joint")
    modes = {m.mode for m in model.modules() if isinstance(m, TemporalBatchNorm)}
    assert modes == {"joint"}


def test_vggsnn_layer_layout():
    """64c3-128c3-AP2-256c3-256c3-AP2-512c3-512c3-AP2-512c3-512c3-AP2-FC, conv without bias."""
    model = build_model("vggsnn", in_channels=2, num_classes=10, T=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 4
    assert sum(isinstance(m, LIF) for m in model.modules()) == 8
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 1 and linear[0].in_features == 512 * 3 * 3


# --- bad input --------------------------------------------------------------------------------


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="model name.*vgsnn") as info:
        build_model("vgsnn", in_channels=2, num_classes=10, T=4)
    for name in ("vggsnn", "resnet18", "cifarnet", "sew_resnet18", "sew_resnet34"):
        assert name in str(info.value)


def test_t_mismatch_raises():
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=16)
    with pytest.raises(ValueError, match="T=4.*T=5"):
        model(torch.zeros(1, 5, 2, 16, 16))


@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 1, 4, 2, 16, 16)])
def test_wrong_rank_input_raises(shape):
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=16)
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\].*\[B, C, H, W\]"):
        model(torch.zeros(shape))


def test_wrong_channel_count_raises():
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=16)
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 3, 16, 16))


def test_unknown_option_raises_and_lists_allowed():
    with pytest.raises(ValueError, match="foo.*allowed.*bn_mode.*init.*mask_p"):
        build_model("vggsnn", in_channels=2, num_classes=10, T=4, foo=1)
    with pytest.raises(ValueError, match="stem"):
        build_model("vggsnn", in_channels=2, num_classes=10, T=4, stem="cifar")


def test_unset_options_and_input_size_reach_only_the_backbones_that_take_them():
    """None means "the backbone's default" (as timm drops None kwargs); ``input_size`` describes the data and
    sizes only the backbones whose layers depend on it, so one call serves every backbone."""
    common = dict(in_channels=2, num_classes=10, T=2, stem=None, stem_pool=None, input_size=16)
    vgg = build_model("vggsnn", **common)
    assert next(m for m in vgg.modules() if isinstance(m, nn.Linear)).in_features == 512  # 16 -> 1 after four pools
    resnet = build_model("resnet18", **common)
    assert any(isinstance(m, nn.AvgPool2d) for m in resnet.stem.modules())
    with pytest.raises(ValueError, match="input_size: 4 is too small"):
        build_model("cifarnet", in_channels=3, num_classes=10, T=2, input_size=4)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"T": 2.5}, "T"),
        ({"mask_p": 1.5}, "mask_p"),
        ({"stem": "x"}, "stem"),
        ({"stem_pool": "x"}, "stem_pool"),
        ({"init": "x"}, "init"),
        ({"bn_mode": "x"}, "bn_mode"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = {"in_channels": 2, "num_classes": 10, "T": 4} | kwargs
    with pytest.raises(ValueError, match=name):
        build_model("resnet18", **args)


def test_too_small_input_size_raises():
    with pytest.raises(ValueError, match="input_size"):
        build_model("vggsnn", in_channels=2, num_classes=10, T=4, input_size=8)
