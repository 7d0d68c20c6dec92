"""Every place where PyTorch, torchvision or timm treat BatchNorm specially, run with the real
library function on a model with L2BN layers (the table in docs/ecosystem.md): what happens, and
what l2bn gives the user where a helper is needed."""

import copy

import pytest
import torch
from torch import nn

import l2bn


def test_not_replaced_by_convert_sync_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4), nn.BatchNorm2d(4))
    out = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(out[1]) is l2bn.L2BatchNorm2d
    assert type(out[2]) is nn.SyncBatchNorm  # the plain BN is converted, ours is not


def test_not_folded_by_fx_fuse():
    from torch.fx.experimental.optimization import fuse

    model = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model)
    # traced through (not a leaf), but the l2 step is still in the graph, not folded into conv
    assert "l2_batch_norm" in fused.code
    assert any(isinstance(m, nn.Conv2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x))


def test_not_folded_by_quantization_fuse_modules():
    from torch.ao.quantization import fuse_modules

    model = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4)).eval()
    # fuse_modules looks fusers up by exact type: a (Conv2d, L2BatchNorm2d) pair has none, so it
    # refuses instead of folding the layer into the conv as if it were BN
    with pytest.raises(AssertionError, match="did not find fuser method.*L2BatchNorm2d"):
        fuse_modules(copy.deepcopy(model), [["0", "1"]])
    # and a model with both kinds: only the real BN pair is fused
    mixed = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), l2bn.L2BatchNorm2d(4)
    ).eval()
    fused = fuse_modules(copy.deepcopy(mixed), [["0", "1"]])
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], l2bn.L2BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), mixed(x), rtol=1e-5, atol=1e-5)


def test_swa_update_bn_skips_l2bn_and_l2bn_update_bn_does_not():
    """torch.optim.swa_utils.update_bn resets and averages only _BatchNorm layers: an L2BN
    layer's stale statistics survive it; l2bn.update_bn recomputes them (more cases in
    test_running_stats.py, including AveragedModel)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_var.fill_(7.0)
        model[1].num_batches_tracked.fill_(10_000)
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    stale = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, stale)
    assert bool((stale[1].running_var > 5).all())
    l2bn.update_bn(batches, model)
    assert bool((model[1].running_var < 1).all()) and int(model[1].num_batches_tracked) == 2


def _torchvision_reference_groups(model, norm_classes):
    """The rule of torchvision's references/classification ``set_weight_decay``: a module's
    parameters go to the norm group iff ``isinstance(module, norm_classes)``."""
    norm, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            (norm if isinstance(module, norm_classes) else other).append(p)
    return norm, other


def test_weight_decay_groups_with_l2_norm_classes():
    """torchvision's reference recipes exclude norm layers from weight decay by class; its
    default list (``_BatchNorm``, LayerNorm, GroupNorm, ``_InstanceNorm``, LocalResponseNorm)
    misses L2BN, ``l2bn.L2_NORM_CLASSES`` completes it."""
    default = (
        nn.modules.batchnorm._BatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LocalResponseNorm,
    )
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4), l2bn.SyncL2BatchNorm(4), nn.BatchNorm2d(4)
    )
    l2_params = {id(p) for i in (1, 2) for p in model[i].parameters()}
    norm, _ = _torchvision_reference_groups(model, default)
    assert not l2_params & {id(p) for p in norm}  # decayed: the silent miss
    norm, other = _torchvision_reference_groups(model, default + l2bn.L2_NORM_CLASSES)
    assert l2_params <= {id(p) for p in norm} and len(other) == 2  # only the conv's weight and bias


def test_timm_weight_decay_groups_exclude_l2bn_parameters():
    """timm's param_groups_weight_decay excludes 1-D parameters and biases: L2BN's weight and
    bias are excluded as BN's are, with no help needed."""
    timm = pytest.importorskip("timm")
    from timm.optim import param_groups_weight_decay

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), l2bn.L2BatchNorm2d(4))
    groups = {g["weight_decay"]: g for g in param_groups_weight_decay(model, weight_decay=1e-4)}
    decay, no_decay = groups[1e-4], groups[0.0]
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3)]
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert timm.__version__


def test_timm_freeze_batch_norm_2d_leaves_l2bn_training_and_l2bn_freeze_does_not():
    """timm's freeze_batch_norm_2d freezes BN by type and leaves L2BN layers trainable (their
    statistics keep moving in training mode); l2bn.freeze turns them into FrozenL2BatchNorm:
    no parameters, statistics fixed in every mode, outputs equal to the layer's evaluation."""
    pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), l2bn.L2BatchNorm2d(4)
    )
    model(torch.randn(4, 3, 6, 6))  # statistics from one step
    timm_frozen = freeze_batch_norm_2d(copy.deepcopy(model))
    assert type(timm_frozen[1]).__name__ == "FrozenBatchNorm2d"
    assert isinstance(timm_frozen[3], l2bn.L2BatchNorm2d) and timm_frozen[3].weight.requires_grad
    before = timm_frozen[3].running_mean.clone()
    timm_frozen.train()(torch.randn(4, 3, 6, 6))
    assert not torch.equal(before, timm_frozen[3].running_mean)  # the silent miss
    frozen = l2bn.freeze(freeze_batch_norm_2d(copy.deepcopy(model)))
    assert isinstance(frozen[3], l2bn.FrozenL2BatchNorm) and not any(
        p.requires_grad for p in frozen[3].parameters()
    )
    assert set(frozen[3].state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(frozen.train()(x), copy.deepcopy(model).eval()(x))
    torch.testing.assert_close(frozen[3].running_mean, model[3].running_mean, rtol=0, atol=0)


def test_freeze_keeps_norm_act_and_options():
    from l2bn.convert import L2BatchNormAct2d

    layer = L2BatchNormAct2d(4, act=nn.ReLU(), unit_rms=True, l2_eps=1e-6)
    layer(torch.randn(3, 4, 5, 5))
    frozen = l2bn.freeze(layer)
    assert frozen.unit_rms and frozen.l2_eps == 1e-6 and isinstance(frozen.act, nn.ReLU)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(frozen(x), layer.eval()(x))
    assert bool((frozen(x) >= 0).all())


def test_l2bn_trainer_excludes_l2bn_parameters_from_weight_decay():
    from l2bn.train.optim import param_groups

    model = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4), l2bn.SyncL2BatchNorm(4))
    groups = {
        g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(model, 5e-4, False)
    }
    assert groups[5e-4] == {id(model[0].weight)}
    assert {id(p) for i in (1, 2) for p in model[i].parameters()} <= groups[0.0]
