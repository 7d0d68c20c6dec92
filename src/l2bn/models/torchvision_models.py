"""ImageNet-scale torchvision models by name (``tv_resnet18``, ``tv_resnet50``, ...): built with
random weights, BN layers converted with :func:`l2bn.convert` when ``norm`` is an L2 variant."""

from __future__ import annotations

from torch import nn

from .registry import register_model

_NAMES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121")


def _make(tv_name: str):
    def build(num_classes: int = 1000, in_channels: int = 3, norm: str = "bn") -> nn.Module:
        import torchvision

        from ..convert import convert

        if in_channels != 3:
            raise ValueError(f"torchvision {tv_name} expects 3 input channels, got {in_channels}")
        model = getattr(torchvision.models, tv_name)(weights=None, num_classes=num_classes)
        n = str(norm).lower()
        if n in ("l2bn", "l2", "l2bn-rms"):
            model = convert(model, unit_rms=n == "l2bn-rms")
        elif n not in ("bn", "batchnorm"):
            raise ValueError(f"tv_{tv_name} supports norm 'bn', 'l2bn' or 'l2bn-rms', got {norm!r}")
        return model

    build.__doc__ = f"torchvision {tv_name} (random init), BN or converted to L2BN."
    return build


for _n in _NAMES:
    register_model(f"tv_{_n}")(_make(_n))
