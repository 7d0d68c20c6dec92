"""l2bn.convert / revert / factory on torchvision, timm and hand-made models."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import l2bn
from l2bn.modules import _L2NormBase

torchvision = pytest.importorskip("torchvision")


def _with_normalize_hooks(model: nn.Module) -> nn.Module:
    """The original model with F.normalize inserted before every BN (the expected result)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(
                lambda mod, args: (F.normalize(args[0].flatten(1), dim=1).view_as(args[0]),)
            )
    return ref


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-0.01, 0.01)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(1000)  # statistics of a trained model


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_torchvision_models(name):
    """With running_stats="keep", convert is BN(F.normalize(x)) with every value of the BN model."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).double()
    _randomize_bn(model)
    n_bn = _count(model, _BatchNorm)
    ref = _with_normalize_hooks(model)
    conv = l2bn.convert(copy.deepcopy(model), running_stats="keep")
    assert _count(conv, _L2NormBase) == n_bn and _count(conv, _BatchNorm) == 0
    assert list(conv.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for training in (False, True):
        ref.train(training)
        conv.train(training)
        torch.manual_seed(1)  # same dropout / stochastic-depth masks on both sides
        y_conv = conv(x)
        torch.manual_seed(1)
        torch.testing.assert_close(y_conv, ref(x), rtol=1e-7, atol=1e-7)
    for (k, a), b in zip(conv.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=k)
    trained = {k: v.clone() for k, v in conv.state_dict().items()}  # after the training-mode step
    back = l2bn.revert(conv, running_stats="keep")
    assert _count(back, _L2NormBase) == 0 and _count(back, _BatchNorm) == n_bn
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    for k, v in back.state_dict().items():  # revert keeps the L2 model's current values
        assert torch.equal(v, trained[k]), k
    # ... and computes plain BN with them: the original model loaded with those values
    model2 = copy.deepcopy(model).eval()
    model2.load_state_dict(trained)
    torch.testing.assert_close(back.eval()(x), model2(x), rtol=1e-9, atol=1e-9)


def test_copies_not_aliases_and_keeps_flags():
    bn = nn.BatchNorm2d(4)
    bn.weight.requires_grad_(False)
    bn.eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
    conv = l2bn.convert(model)
    new = conv[1]
    assert isinstance(new, l2bn.L2BatchNorm2d) and not new.training
    assert not new.weight.requires_grad and new.bias.requires_grad
    assert new.running_mean.data_ptr() != bn.running_mean.data_ptr()
    assert new.weight.data_ptr() != bn.weight.data_ptr()
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
    assert float(new.running_mean.abs().max()) == 0.0


def test_dtype_and_bare_layer():
    bn = nn.BatchNorm1d(5, dtype=torch.float64, momentum=None, eps=1e-3)
    new = l2bn.convert(bn)
    assert type(new) is l2bn.L2BatchNorm1d
    assert new.weight.dtype == torch.float64 and new.momentum is None and new.eps == 1e-3
    synced = l2bn.convert(nn.BatchNorm3d(2), sync=True)
    assert type(synced) is l2bn.SyncL2BatchNorm
    assert type(l2bn.convert(nn.SyncBatchNorm(3))) is l2bn.SyncL2BatchNorm
    assert type(l2bn.revert(l2bn.convert(nn.SyncBatchNorm(3)))) is nn.SyncBatchNorm


def test_include_exclude():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)))
    out = l2bn.convert(copy.deepcopy(model), exclude="0")
    assert type(out[0]) is nn.BatchNorm2d and type(out[1][0]) is l2bn.L2BatchNorm2d
    out = l2bn.convert(copy.deepcopy(model), include=["1.*"])
    assert type(out[0]) is nn.BatchNorm2d and type(out[1][1]) is l2bn.L2BatchNorm2d
    out = l2bn.convert(copy.deepcopy(model), include=lambda name, m: name.endswith("1"))
    assert [type(m).__name__ for m in (out[0], out[1][0], out[1][1])] == [
        "BatchNorm2d",
        "BatchNorm2d",
        "L2BatchNorm2d",
    ]
    with pytest.raises(ValueError, match="matched by both include and exclude"):
        l2bn.convert(copy.deepcopy(model), include="1.*", exclude="1.0")


def test_no_bn_warns_once_and_returns_unchanged():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = l2bn.convert(model)
    assert out is model
    assert len([x for x in w if "no BatchNorm layer" in str(x.message)]) == 1


def test_custom_forward_subclass_is_refused():
    class Weird(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class KeepsForward(nn.BatchNorm2d):
        pass

    with pytest.raises(TypeError, match="its own forward"):
        l2bn.convert(nn.Sequential(Weird(3)))
    assert type(l2bn.convert(nn.Sequential(KeepsForward(3)))[0]) is l2bn.L2BatchNorm2d


def test_timm_models():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    for name in ("resnet18", "efficientnet_b0"):
        model = timm.create_model(name, pretrained=False, num_classes=10).double()
        _randomize_bn(model)
        n_bn = _count(model, _BatchNorm)
        n_act = _count(model, BatchNormAct2d)
        ref = _with_normalize_hooks(model)
        conv = l2bn.convert(copy.deepcopy(model), running_stats="keep")
        assert _count(conv, _BatchNorm) == 0 and _count(conv, _L2NormBase) == n_bn
        assert _count(conv, l2bn.convert.__globals__["L2BatchNormAct2d"]) == n_act
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        for training in (False, True):
            ref.train(training)
            conv.train(training)
            torch.manual_seed(1)
            y_conv = conv(x)
            torch.manual_seed(1)
            torch.testing.assert_close(y_conv, ref(x), rtol=1e-7, atol=1e-7)
        back = l2bn.revert(conv, running_stats="keep")
        assert _count(back, BatchNormAct2d) == n_act and _count(back, _L2NormBase) == 0
        model.load_state_dict(back.state_dict())  # revert kept the (updated) values
        model.eval()
        back.eval()
        torch.testing.assert_close(back(x), model(x), rtol=1e-9, atol=1e-9)


def test_factory():
    assert type(l2bn.create_norm("l2bn", 4)) is l2bn.L2BatchNorm2d
    assert type(l2bn.create_norm("BN", 4, dim=1)) is nn.BatchNorm1d
    assert l2bn.create_norm("l2bn-rms", 4, dim=3).unit_rms
    assert type(l2bn.create_norm("none", 4)) is nn.Identity
    assert type(l2bn.create_norm("sync-l2bn", 4)) is l2bn.SyncL2BatchNorm
    assert l2bn.get_norm_layer("l2bn", eps=1e-3)(4).eps == 1e-3
    with pytest.raises(ValueError, match="unknown norm layer 'groupnorm'"):
        l2bn.get_norm_layer("groupnorm")
