"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download)."""

from __future__ import annotations

from . import Dataset


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A stratified train/test split; pixels scaled from [0, 16] to [0, 1], flattened to 64."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    x, y = sk_load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)
