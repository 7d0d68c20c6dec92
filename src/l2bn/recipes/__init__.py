"""The recipes that ship with l2bn: YAML files of :class:`l2bn.train.TrainConfig` fields (the
paper-style CIFAR/ImageNet runs, the DCASE 2020 Task 1A networks, the spoken-digits demo).

``l2bn train --config NAME`` and ``l2bn compare --config NAME`` take a recipe's name (the file
name without ``.yaml``) or a path to any YAML file; ``l2bn train --list-configs`` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from ..io import MissingFile

__all__ = ["list_recipes", "resolve_recipe"]

_HERE = Path(__file__).parent


def list_recipes() -> List[str]:
    """Names of the shipped recipes.

    Example:
        >>> "cifar10-resnet56" in list_recipes()
        True
    """
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """The YAML file for ``name_or_path``: an existing file, else a shipped recipe's name (with
    or without ``.yaml``).

    Raises:
        FileNotFoundError: neither; the message lists the shipped recipes.

    Example:
        >>> resolve_recipe("dcase2020-1a-resnet").name
        'dcase2020-1a-resnet.yaml'
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = _HERE / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    raise MissingFile(
        f"config file not found: {name_or_path} (expected a YAML file or one of the shipped "
        f"recipes: "
        f"{', '.join(list_recipes())})"
    )
