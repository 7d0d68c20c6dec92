"""The DCASE 2020 Task 1A networks against the authors' Keras reference, and the recipe's pieces.

Reference numbers (parameter totals, per-layer output shapes, TensorFlow "same" paddings,
learning-rate schedule) are from the Keras build of Ingrid725/ASC_L2BN @ 55b5024 (identical to
MihawkHu/DCASE2020_task1 task1a/10class), summarised in docs/acoustic.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from l2bn import L2BatchNorm2d
from l2bn.data import augment as aug
from l2bn.models import create_model
from l2bn.models.dcase import (
    REFERENCE,
    AvgPool2dSame,
    ChannelAttention,
    Conv2dSame,
    MaxPool2dSame,
    _PreActBlock,
    default_final_norm,
    param_counts,
    tf_same_padding,
)

NETS = list(REFERENCE)
ROOT = Path(__file__).resolve().parents[1]


def _meta(name: str, norm: str = "bn", **kw) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, 10, 3, norm, **kw)


# ------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("norm", ["bn", "l2bn", "l2bn-rms"])
@pytest.mark.parametrize("name", NETS)
def test_parameter_counts_equal_keras(name, norm):
    """parameters() = Keras trainable; running mean + var = Keras non-trainable, for every norm."""
    net = _meta(name, norm)
    assert param_counts(net) == REFERENCE[name]


# (norm layers, affine among them, convolutions, dense layers, dropout rate x count)
INVENTORY = {
    "dcase-resnet": (37, 2, 36, 0, (None, 0)),
    "dcase-fcnn": (11, 9, 9, 2, (0.3, 3)),
    "dcase-fsfcnn": (13, 11, 11, 2, (0.5, 2)),
}


@pytest.mark.parametrize("name", NETS)
def test_layer_inventory(name):
    net = _meta(name)
    n_norm, n_affine, n_conv, n_dense, (p, n_drop) = INVENTORY[name]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == n_norm and sum(m.affine for m in norms) == n_affine
    assert all(m.weight is None and m.bias is None for m in norms if not m.affine)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_conv and all(c.bias is None for c in convs)  # bias-free everywhere
    dense = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(dense) == n_dense and all(d.bias is not None for d in dense)
    drops = [m for m in net.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    assert len(drops) == n_drop and all(
        type(d) is nn.Dropout and d.p == p for d in drops
    )  # element-wise, as Keras
    if n_dense:  # one shared pair of Dense layers (10 -> 5 -> 10) in the channel attention
        att = [m for m in net.modules() if isinstance(m, ChannelAttention)]
        assert len(att) == 1 and (
            att[0].fc1.in_features,
            att[0].fc1.out_features,
            att[0].fc2.out_features,
        ) == (10, 5, 10)


# per-stage outputs (C, F, T) for T = 400 and 423, from the reference tables
STAGES = {
    "dcase-resnet": {
        "path1.conv_in": ((48, 64, 200), (48, 64, 212)),
        "path1.stage1": ((48, 64, 200), (48, 64, 212)),
        "path1.stage2.0.pool": ((48, 64, 100), (48, 64, 106)),
        "path1.stage2": ((96, 64, 100), (96, 64, 106)),
        "path1.stage3": ((192, 64, 50), (192, 64, 53)),
        "path2.stage4": ((384, 64, 25), (384, 64, 27)),
        "conv1": ((1536, 128, 25), (1536, 128, 27)),
        "conv2": ((10, 128, 25), (10, 128, 27)),
    },
    "dcase-fcnn": {
        "block1.0": ((144, 64, 200), (144, 64, 212)),
        "block1": ((144, 32, 100), (144, 32, 106)),
        "block2": ((288, 16, 50), (288, 16, 53)),
        "block3": ((576, 8, 25), (576, 8, 26)),
        "head.conv": ((10, 8, 25), (10, 8, 26)),
    },
    "dcase-fsfcnn": {
        "block1.0": ((48, 128, 200), (48, 128, 212)),
        "block1": ((48, 64, 100), (48, 64, 106)),
        "block2": ((96, 32, 50), (96, 32, 53)),
        "block3.6": ((512, 32, 25), (512, 32, 27)),
        "block3": ((512, 32, 13), (512, 32, 14)),
        "block4": ((768, 32, 13), (768, 32, 14)),
        "head.conv": ((10, 32, 13), (10, 32, 14)),
    },
}


@pytest.mark.parametrize("t_index,frames", [(0, 400), (1, 423)])
@pytest.mark.parametrize("name", NETS)
def test_stage_output_shapes(name, t_index, frames):
    net = _meta(name).eval()
    mods = dict(net.named_modules())
    seen = {}
    for key in STAGES[name]:
        mods[key].register_forward_hook(
            lambda m, a, o, key=key: seen.__setitem__(key, tuple(o.shape[1:]))
        )
    out = net(torch.empty(2, 3, 128, frames, device="meta"))
    assert tuple(out.shape) == (2, 10)
    assert seen == {k: v[t_index] for k, v in STAGES[name].items()}
    if name == "dcase-resnet":  # the two paths are joined on the frequency axis
        assert seen["conv1"][1] == 2 * seen["path2.stage4"][1]


# TF "same" paddings (freq top, bottom, time left, right) of the strided layers, in call order,
# from the reference (T = 400 | T = 423); the ResNet list is per path.
SAME_PADS = {
    "dcase-resnet": [
        ((1, 1, 0, 1), (1, 1, 1, 1)),
        ((1, 1, 0, 1), (1, 1, 0, 1)),
        ((1, 1, 0, 1), (1, 1, 0, 1)),
        ((1, 1, 0, 1), (1, 1, 0, 1)),
        ((1, 1, 0, 1), (1, 1, 0, 1)),
        ((1, 1, 0, 1), (1, 1, 1, 1)),
        ((1, 1, 0, 1), (1, 1, 1, 1)),
    ],
    "dcase-fcnn": [],
    "dcase-fsfcnn": [
        ((2, 2, 1, 2), (2, 2, 2, 2)),
        ((0, 1, 0, 1), (0, 1, 0, 1)),
        ((0, 1, 0, 1), (0, 1, 0, 1)),
        ((1, 1, 0, 1), (1, 1, 1, 1)),
        ((1, 1, 1, 1), (1, 1, 1, 1)),
    ],
}


@pytest.mark.parametrize("t_index,frames", [(0, 400), (1, 423)])
@pytest.mark.parametrize("name", NETS)
def test_tf_same_padding_of_strided_layers(name, t_index, frames):
    net = _meta(name).eval()
    pads = []

    def rec(m, args):
        k, s = m.kernel_size, m.stride
        if tuple(s) != (1, 1):
            pads.append(
                tf_same_padding(args[0].shape[2], k[0], s[0])
                + tf_same_padding(args[0].shape[3], k[1], s[1])
            )

    for prefix, m in net.named_modules():
        if isinstance(m, (Conv2dSame, MaxPool2dSame, AvgPool2dSame)) and not prefix.startswith(
            "path2"
        ):
            m.register_forward_pre_hook(rec)
    net(torch.empty(1, 3, 128, frames, device="meta"))
    assert pads == [p[t_index] for p in SAME_PADS[name]]
    # stride-1 "same" convolutions pad symmetrically k // 2, as TF does for odd kernels
    for m in net.modules():
        if isinstance(m, Conv2dSame) and m.stride == (1, 1):
            assert m.padding == (m.kernel_size[0] // 2, m.kernel_size[1] // 2)


def test_tf_same_padding_formula():
    assert tf_same_padding(400, 3, 2) == (0, 1) and tf_same_padding(423, 3, 2) == (1, 1)
    assert tf_same_padding(400, 5, 2) == (1, 2) and tf_same_padding(128, 5, 1) == (2, 2)
    assert tf_same_padding(128, 3, 2) == (0, 1) and tf_same_padding(53, 3, 2) == (1, 1)


def test_conv2d_same_is_tf_grid_not_pytorch_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 10)
    conv = Conv2dSame(3, 4, 3, (1, 2))
    ref = F.conv2d(
        F.pad(x, (0, 1, 1, 1)), conv.weight, stride=(1, 2)
    )  # TF: extra column at the end
    assert torch.allclose(conv(x), ref, atol=1e-6)
    torch_grid = F.conv2d(x, conv.weight, stride=(1, 2), padding=1)
    assert torch_grid.shape == ref.shape and not torch.allclose(torch_grid, ref)


def test_avg_pool_same_divides_by_valid_cells():
    x = torch.rand(1, 2, 5, 8)
    out = AvgPool2dSame(3, (1, 2))(x)  # T = 8: time padding (0, 1); freq padding (1, 1)
    assert out.shape == (1, 2, 5, 4)
    assert torch.allclose(AvgPool2dSame(3, (1, 2))(torch.ones(1, 1, 5, 8)), torch.ones(1, 1, 5, 4))
    assert torch.allclose(out[0, :, 0, 0], x[0, :, 0:2, 0:3].mean(dim=(1, 2)))  # top row padded
    assert torch.allclose(out[0, :, 2, 1], x[0, :, 1:4, 2:5].mean(dim=(1, 2)))  # interior
    assert torch.allclose(
        out[0, :, 2, 3], x[0, :, 1:4, 6:8].mean(dim=(1, 2))
    )  # last window: 2 valid columns


def test_max_pool_same_ignores_padding():
    x = -torch.rand(1, 1, 5, 6) - 1.0  # all negative: a zero pad would win
    out = MaxPool2dSame(3, 2)(x)
    assert out.shape == (1, 1, 3, 3) and bool((out < -1.0 + 1e-6).all())
    assert torch.allclose(out[0, 0, 2, 2], x[0, 0, 4:, 4:].max())


def test_resnet_downsampling_shortcut_is_avgpool_plus_zero_channels():
    block = _PreActBlock(4, 8, True, lambda c, affine: nn.BatchNorm2d(c, affine=affine))
    nn.init.zeros_(block.conv2.weight)  # residual branch off
    x = torch.randn(2, 4, 6, 10)
    out = block(x)
    assert out.shape == (2, 8, 6, 5)
    assert torch.allclose(out[:, :4], AvgPool2dSame(3, (1, 2))(x)) and bool((out[:, 4:] == 0).all())


def test_channel_attention_formula_shared_weights():
    att = ChannelAttention(10, 2)
    x = torch.randn(3, 10, 4, 5)
    mlp = lambda v: att.fc2(torch.relu(att.fc1(v)))  # noqa: E731
    want = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    assert torch.allclose(att(x), want)
    assert sum(p.numel() for p in att.parameters()) == 115


@pytest.mark.parametrize(
    "name,kw",
    [
        ("dcase-resnet", {"width": 8}),
        ("dcase-fcnn", {"num_filters": (8, 16, 32)}),
        ("dcase-fsfcnn", {"num_filters": (8, 16, 32, 48)}),
    ],
)
def test_keras_he_normal_init(name, kw):
    """Every kernel ~ truncated normal at +-2 sd with variance 2 / fan_in (narrow nets, fast)."""
    torch.manual_seed(0)
    net = create_model(name, 10, 3, "bn", **kw)
    z = []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().flatten()
            scale = math.sqrt(2.0 / m.weight[0].numel())
            assert (
                float(w.abs().max()) <= 2 * scale / 0.87962566103423978 + 1e-7
            )  # truncated at 2 sd
            z.append(w / scale)
            if m.bias is not None:
                assert float(m.bias.detach().abs().max()) == 0
    z = torch.cat(z)
    assert abs(float(z.std()) - 1) < 0.01 and abs(float(z.mean())) < 0.01


# ------------------------------------------------------------------------- where L2BN goes


@pytest.mark.parametrize(
    "name,switchable", [("dcase-resnet", 36), ("dcase-fcnn", 10), ("dcase-fsfcnn", 12)]
)
def test_l2bn_everywhere_but_the_final_bn(name, switchable):
    net = _meta(name, "l2bn")
    l2 = [m for m in net.modules() if isinstance(m, L2BatchNorm2d)]
    bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(l2) == switchable and bn == [net.final_bn]
    assert not net.final_bn.affine and net.final_bn.num_features == 10
    assert all(not m.unit_rms for m in l2)
    rms = _meta(name, "l2bn-rms")
    assert all(m.unit_rms for m in rms.modules() if isinstance(m, L2BatchNorm2d))
    # the ablation that also switches the last layer is explicit
    all_l2 = _meta(name, "l2bn", final_norm="l2bn")
    assert sum(isinstance(m, L2BatchNorm2d) for m in all_l2.modules()) == switchable + 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in all_l2.modules())
    # the final layer sits right before the pooling: its output feeds the logits
    assert isinstance(net.final_bn, nn.BatchNorm2d)


def test_default_final_norm():
    assert default_final_norm("l2bn") == "bn" and default_final_norm("L2BN-RMS") == "bn"
    assert default_final_norm("sync-l2bn") == "syncbn" and default_final_norm("none") == "none"


@pytest.mark.parametrize("name", NETS)
def test_keras_bn_constants(name):
    for norm in ("bn", "l2bn-rms"):
        net = _meta(name, norm)
        layers = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, L2BatchNorm2d))]
        assert {(m.eps, m.momentum) for m in layers} == {(1e-3, 0.01)}
    net = _meta(name, "l2bn", bn_eps=1e-5, bn_momentum=0.1)
    assert {
        (m.eps, m.momentum) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, L2BatchNorm2d))
    } == {(1e-5, 0.1)}


def test_feature_tap_gives_pooled_classifier_input():
    from l2bn.analysis.probes import FeatureProbe

    torch.manual_seed(0)
    net = create_model("dcase-fcnn", 10, 3, "bn").eval()
    x = torch.randn(2, 3, 128, 64)
    with FeatureProbe(net, layer=net.feature_layer) as probe:
        net(x)
    assert torch.allclose(probe.features(), net.features(x), atol=1e-5)
    assert probe.features().shape == (2, 576)


# ------------------------------------------------------------------------------ recipe pieces


def test_sgdr_is_cosine_warm_restarts_t0_2_mult_2():
    """The authors' LR_WarmRestart, replayed: lr at the first batch of epochs 0-13."""
    want = [
        0.1,
        0.050005,
        0.1,
        0.085356804,
        0.050005,
        0.014653196,
        0.1,
        0.096194357,
        0.085356804,
        0.069137258,
        0.050005,
        0.030872742,
        0.014653196,
        0.0038156428,
    ]
    steps = 437
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=2 * steps, T_mult=2, eta_min=1e-5
    )
    got = []
    for s in range(14 * steps):
        if s % steps == 0:
            got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(want, abs=1e-8)


def test_spec_augment_masks_one_band_and_one_span_per_sample_and_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 128, 423) + 1.0
    y = aug.spec_augment(x, 12, 39, g)
    assert bool((x > 0).all())  # input untouched
    fw, tw = [], []
    for n in range(64):
        for c in range(3):
            z = y[n, c] == 0
            full_rows = z.all(dim=1).nonzero().flatten()
            full_cols = z.all(dim=0).nonzero().flatten()
            for idx, widths, cap, size in ((full_rows, fw, 12, 128), (full_cols, tw, 39, 423)):
                if len(idx):
                    assert (
                        int(idx[-1] - idx[0]) + 1 == len(idx) and int(idx[-1]) < size
                    )  # contiguous
                widths.append(len(idx))
                assert len(idx) <= cap
            # nothing else is zeroed
            assert bool((z == (z.all(dim=1, keepdim=True) | z.all(dim=0, keepdim=True))).all())
    assert (
        min(fw) == 0 and max(fw) == 12 and min(tw) <= 2 and max(tw) >= 36
    )  # the full width ranges occur
    masks = (y == 0).view(64, 3, -1)
    assert not all(
        torch.equal(masks[n, 0], masks[n, 1]) for n in range(64)
    )  # independent per channel
    assert torch.equal(y, aug.spec_augment(x, 12, 39, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="mask widths"):
        aug.spec_augment(x, 128, 39, g)


def test_per_sample_time_crop_independent_windows():
    x = torch.arange(423.0).expand(200, 3, 4, 423).contiguous()
    out = aug.per_sample_time_crop(x, 400, torch.Generator().manual_seed(0))
    assert out.shape == (200, 3, 4, 400)
    starts = out[:, 0, 0, 0].long()
    assert torch.equal(
        out, starts.view(-1, 1, 1, 1) + torch.arange(400.0).view(1, 1, 1, -1).expand_as(out)
    )
    assert (
        int(starts.min()) == 0 and int(starts.max()) == 22
    )  # np.random.randint(0, 423 - 400): 0..22
    assert len(set(starts.tolist())) == 23
    wide = aug.per_sample_time_crop(
        x, 400, torch.Generator().manual_seed(0), include_last_offset=True
    )
    assert int(wide[:, 0, 0, 0].max()) == 23
    assert aug.per_sample_time_crop(x[..., :300], 400, None).shape[-1] == 300


def test_mixup_pairs_second_set_of_clips_and_per_sample_lambda():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 10), torch.arange(64) % 10
    xm, y1, y2, lam = aug.mixup_pairs(x, y, 0.4, g)
    assert xm.shape == (32, 3, 8, 10) and lam.shape == (32,)
    assert torch.equal(y1, y[:32]) and torch.equal(y2, y[32:])
    assert torch.allclose(xm, lam.view(-1, 1, 1, 1) * x[:32] + (1 - lam.view(-1, 1, 1, 1)) * x[32:])
    assert len(set(lam.tolist())) == 32 and bool(((lam > 0) & (lam < 1)).all())
    big = aug.mixup_pairs(torch.zeros(400_000, 1), torch.zeros(400_000, dtype=torch.long), 0.4, g)[
        3
    ]
    assert (
        abs(float(big.mean()) - 0.5) < 0.003 and abs(float(big.var()) - 0.25 / 1.8) < 0.002
    )  # Beta(0.4, 0.4)
    xe, ye = torch.randn(4, 2), torch.arange(4)
    assert aug.mixup_pairs(xe, ye, 0.4, g, x2=xe.flip(0), y2=ye.flip(0))[0].shape == (4, 2)
    with pytest.raises(ValueError, match="even number"):
        aug.mixup_pairs(torch.randn(5, 2), torch.arange(5), 0.4, g)


def test_mixup_cross_entropy_is_soft_target_cross_entropy():
    logits, y1, y2 = torch.randn(16, 10), torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    lam = torch.rand(16)
    soft = lam[:, None] * F.one_hot(y1, 10) + (1 - lam[:, None]) * F.one_hot(y2, 10)
    assert torch.allclose(
        aug.mixup_cross_entropy(logits, y1, y2, lam), F.cross_entropy(logits, soft)
    )


def test_pair_batch_indices_cover_two_passes():
    n, b = 13965, 32
    steps = math.ceil(n / b)  # the authors' steps_per_epoch: 437 steps of 64 clips
    idx = aug.pair_batch_indices(n, b, steps, torch.Generator().manual_seed(0))
    assert idx.shape == (437, 64)
    counts = torch.bincount(idx.flatten(), minlength=n)
    assert int(counts.min()) >= 2 and int(counts.max()) <= 3
    assert sorted(idx.flatten()[:n].tolist()) == list(range(n))  # the first pass is a permutation


def test_apply_pipeline_masks_before_cropping():
    x = torch.rand(6, 3, 128, 423) + 1
    a = aug.apply("specaug12x39+tcrop400-each", x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    b = aug.per_sample_time_crop(aug.spec_augment(x, 12, 39, g), 400, g)
    assert torch.equal(a, b) and a.shape == (6, 3, 128, 400)
    assert aug.apply("tcrop400", x, None).shape[-1] == 400
    with pytest.raises(ValueError, match="unknown augmentation"):
        aug.apply("specaug12", x, None)


@pytest.mark.parametrize(
    "name,epochs,wd,decay,specaug",
    [
        ("resnet", 126, 2e-3, 1e-6, False),
        ("fcnn", 254, 0.0, 1e-6, True),
        ("fsfcnn", 254, 0.0, 0.0, True),
    ],
)
def test_recipes_equal_the_reference(name, epochs, wd, decay, specaug):
    cfg = yaml.safe_load(
        (ROOT / "src" / "l2bn" / "recipes" / f"dcase2020-1a-{name}.yaml").read_text()
    )
    assert (
        cfg["model"] == f"dcase-{name}"
        and cfg["dataset"] == "dcase2020-1a"
        and cfg["norm"] == "l2bn-rms"
    )
    assert cfg["epochs"] == epochs and cfg["weight_decay"] == wd and cfg["lr_decay"] == decay
    assert (cfg["schedule"], cfg["sgdr_t0"], cfg["sgdr_mult"], cfg["lr"], cfg["min_lr"]) == (
        "sgdr",
        2,
        2,
        0.1,
        1e-5,
    )
    assert (
        cfg["batch_size"],
        cfg["momentum"],
        cfg["nesterov"],
        cfg.get("wd_on_norm_and_bias", False),
    ) == (32, 0.9, False, False)
    assert (cfg["bn_eps"], cfg["bn_momentum"], cfg["mixup"], cfg["mixup_mode"]) == (
        1e-3,
        0.01,
        0.4,
        "pairs",
    )
    assert cfg["augment"] == ("specaug12x39+tcrop400-each" if specaug else "tcrop400-each")
    assert (
        sum(2 * 2**i for i in range(int(math.log2(epochs + 2)) - 1)) == epochs
    )  # ends at a cycle minimum
    aug.apply(cfg["augment"], torch.rand(2, 3, 128, 423), torch.Generator().manual_seed(0))


# ------------------------------------------------------ a few training steps on a TAU fixture


@pytest.fixture(scope="module")
def tau_fixture(tmp_path_factory):
    pytest.importorskip("soundfile")
    pytest.importorskip("librosa")
    from test_audio import make_dcase

    from l2bn.data import load_dataset

    root = make_dcase(
        tmp_path_factory.mktemp("tau") / "TAU-urban-acoustic-scenes-2020-mobile-development",
        seconds=1.5,
    )
    return load_dataset("dcase2020-1a", str(root), seconds=1.5)


@pytest.mark.parametrize(
    "name,norm",
    [("dcase-resnet", "l2bn-rms"), ("dcase-fcnn", "l2bn"), ("dcase-fsfcnn", "l2bn-rms")],
)
def test_a_few_recipe_steps_on_the_official_layout(tau_fixture, name, norm, monkeypatch):
    """SpecAugment -> per-clip crop -> paired mixup -> soft-target loss -> SGD, then evaluation on
    the full clips with per-device accuracy groups (the lead's CLI test covers the engine)."""
    monkeypatch.setenv("L2BN_BACKEND", "fused")
    b = tau_fixture
    assert b.input_shape == (3, 128, 57) and b.augment == "tcrop400-each"
    torch.manual_seed(0)
    net = create_model(name, b.num_classes, b.in_channels, norm)
    decay = [p for p in net.parameters() if p.ndim >= 2]
    rest = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 2e-3}, {"params": rest, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
    )
    g = torch.Generator().manual_seed(0)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    for idx in aug.pair_batch_indices(len(b.train_y), 2, 2, g):  # 2 steps of 2 x 2 clips
        x = aug.transform(b.transform, b.train_x[idx].float())
        x = aug.apply("specaug12x39+tcrop40-each", x, g)
        x, y1, y2, lam = aug.mixup_pairs(x, b.train_y[idx], 0.4, g)
        loss = aug.mixup_cross_entropy(net(x), y1, y2, lam)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = net.state_dict()
    assert not torch.equal(
        start["final_bn.running_mean" if name == "dcase-resnet" else "head.final_bn.running_mean"],
        end["final_bn.running_mean" if name == "dcase-resnet" else "head.final_bn.running_mean"],
    )
    conv = next(k for k in end if k.endswith("weight") and end[k].ndim == 4)
    assert not torch.equal(start[conv], end[conv])
    net.eval()
    with torch.no_grad():
        out = net(aug.transform(b.transform, b.test_x[:4].float()))  # full length, no augmentation
    assert out.shape == (4, b.num_classes) and bool(torch.isfinite(out).all())
    assert sorted(set(b.test_groups)) == ["a", "c", "s4"]
