"""ImageNet-scale torchvision models by name (``tv_resnet18``, ``tv_resnet50``, ...), random
weights, with the norm layers of :func:`l2bn.get_norm_layer` — passed as torchvision's
``norm_layer`` where the builder takes one, else by :func:`l2bn.convert` of the BN model."""

from __future__ import annotations

import inspect

from torch import nn

from ..factory import canonical_norm, get_norm_layer
from ..io import BadInput
from .registry import register_model

_NAMES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121")


def _make(tv_name: str):
    def build(num_classes: int = 1000, in_channels: int = 3, norm: str = "bn") -> nn.Module:
        import torchvision

        from ..convert import convert

        if in_channels != 3:
            raise BadInput(f"torchvision {tv_name} expects 3 input channels, got {in_channels}")
        key = canonical_norm(norm)
        if key == "none":
            raise BadInput(f"tv_{tv_name} needs a norm layer; got {norm!r}")
        builder = getattr(torchvision.models, tv_name)
        if "norm_layer" in inspect.signature(builder).parameters or tv_name.startswith(
            ("resnet", "mobilenet")
        ):
            return builder(weights=None, num_classes=num_classes, norm_layer=get_norm_layer(key, 2))
        model = builder(weights=None, num_classes=num_classes)
        if key == "bn":
            return model
        if key == "syncbn":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return convert(model, sync=key.startswith("sync"), unit_rms=key.endswith("-rms"))

    build.__doc__ = f"torchvision {tv_name} (random init) with the norm layers of the factory."
    return build


for _n in _NAMES:
    register_model(f"tv_{_n}")(_make(_n))
