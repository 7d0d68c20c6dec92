"""Model registry: every model takes ``norm=`` (a name understood by :func:`l2bn.get_norm_layer`).

>>> from l2bn.models import create_model
>>> net = create_model("resnet20", num_classes=10, in_channels=3, norm="l2bn")
>>> sum(p.numel() for p in net.parameters())
272474
"""

from . import audio_cnn, cifar_resnet, dcase, mlp, mobilenetv2, torchvision_models, vgg, wrn  # noqa: E402,F401  (register)
from .registry import MODELS, build_model, create_model, list_models, register_model

__all__ = ["MODELS", "build_model", "create_model", "list_models", "register_model"]
