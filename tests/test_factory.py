"""The two registries a newcomer extends: norm names (``l2bn.factory.NORMS``) and models
(``l2bn.models.registry``). Each addition is one entry; these tests pin that everything else
(aliases, synchronised twins, plot colours, the build options a model takes) follows from it."""

import pytest
from torch import nn

import l2bn
from l2bn.factory import NORM_ALIASES, NORM_NAMES, NORMS, Norm, canonical_norm, get_norm_layer
from l2bn.io import BadInput
from l2bn.models import registry
from l2bn.report.plots import COLORS


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_every_norm_builds_from_its_entry(name, dim):
    layer = get_norm_layer(name, dim)(8)
    norm = NORMS[name]
    assert name == "none" or isinstance(layer, norm.layer(dim))
    for key, val in norm.kwargs.items():
        assert getattr(layer, key) == val
    for alias in norm.aliases:
        assert canonical_norm(alias.upper()) == name
    if norm.sync:
        assert canonical_norm(name, sync=True) == norm.sync


def test_names_aliases_and_colours_follow_the_table():
    assert NORM_NAMES == tuple(NORMS) and set(NORM_NAMES) <= set(NORM_ALIASES)
    assert COLORS == {k: v.color for k, v in NORMS.items()}
    assert isinstance(get_norm_layer("l2bn-rms")(4), l2bn.L2BatchNorm2d)
    assert get_norm_layer("l2bn-rms")(4).unit_rms and not get_norm_layer("l2bn")(4).unit_rms
    assert isinstance(get_norm_layer("none")(4), nn.Identity)
    with pytest.raises(BadInput, match="unknown norm layer 'gn'; choose one of bn, l2bn"):
        canonical_norm("gn")


def test_a_new_norm_is_one_entry(monkeypatch):
    monkeypatch.setitem(NORMS, "gn4", Norm(lambda d: lambda c: nn.GroupNorm(4, c)))
    assert isinstance(get_norm_layer("gn4")(8), nn.GroupNorm)


def test_models_declare_the_build_options_they_take():
    assert "width" in registry.TAKES["resnet8"] and "width" not in registry.TAKES["vgg11"]
    assert {"bn_eps", "bn_momentum"} <= registry.TAKES["dcase-fcnn"]
    m = registry.build_model("resnet8", "bn", num_classes=10, input_shape=(1, 28, 28), width=2)
    assert m.fc.in_features == 128
    with pytest.raises(BadInput, match="width is only taken by resnet110, resnet14.*not by 'mlp'"):
        registry.build_model("mlp", "bn", num_classes=10, input_shape=(1, 8, 8), width=2)
    with pytest.raises(BadInput, match="bn_eps is only taken by dcase-fcnn, .*not by 'resnet8'"):
        registry.build_model("resnet8", "bn", num_classes=10, input_shape=(1, 8, 8), bn_eps=1e-3)
    with pytest.raises(ValueError, match="unknown options"):
        registry.register_model("x", takes=("depth",))
