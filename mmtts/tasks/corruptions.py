"""Common image corruptions (Hendrycks & Dietterich 2019) with the CIFAR-10-C severity constants.

The ImageNet-C constants (as in the ``imagecorruptions`` package) are set for
224-pixel images and wipe out 32-pixel ones, so 32x32 sets use the CIFAR-10-C
table, the one that made CIFAR-10-C. Larger images (the pretrained check) use the
ImageNet-C table for the corruptions whose constants do not depend on the image
size. Thirteen of the fifteen benchmark types are here; snow and frost need
ImageMagick's motion blur and the frost photographs, which do not ship offline.
Motion blur, which the reference renders with ImageMagick, is a one-sided
Gaussian line kernel at a random angle in [-45, 45] degrees, as ImageMagick draws it.

Every function takes a float batch (N, H, W, 3) in [0, 1] and a numpy
Generator, so the same seed gives the same corrupted set; :func:`corrupt`
returns the result quantized to 8 bits like the published files.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import hsv2rgb, rgb2hsv

CIFAR = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)],  # fractions of the image side
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}

IMAGENET = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "jpeg_compression": [25, 18, 15, 10, 7],
}

TABLES = {"cifar": CIFAR, "imagenet": IMAGENET}


def gaussian_noise(x, c, rng):
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def shot_noise(x, c, rng):
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x, c, rng):
    """Salt and pepper on a fraction ``c`` of the values, half each."""
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    half = 8 if radius <= 8 else int(np.ceil(radius))
    ax = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(ax, ax)
    kernel = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    kernel /= kernel.sum()
    support = 1 if radius <= 8 else 2  # the reference smooths the disk with a 3x3 (5x5) Gaussian
    return ndimage.gaussian_filter(kernel, alias_blur, mode="mirror", truncate=(support + 0.49) / alias_blur)


def defocus_blur(x, c, rng):
    k = _disk(*c)[None, :, :, None]
    return np.clip(ndimage.correlate(x, k, mode="mirror"), 0, 1)


def _gauss(x, sigma):
    return ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_blur(x, c, rng):
    """Blur, replace each pixel by a random up/left neighbour (sequentially), blur again.

    The reference means to swap the two pixels, but its tuple assignment of
    numpy views copies the neighbour into the pixel and leaves the neighbour as
    it was; the published CIFAR-10-C files were made that way, so this repeats
    the copy (a true swap carries pixels across the image and is a different,
    much stronger corruption). Offsets are drawn from [-delta, delta) as there.
    """
    sigma, delta, iterations = c
    y = (np.clip(_gauss(x, sigma), 0, 1) * 255).astype(np.uint8)
    n, h, w = x.shape[:3]
    rows = np.arange(n)
    for _ in range(iterations):
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=(2, n))
                y[rows, i, j] = y[rows, i + dy, j + dx]
    return np.clip(_gauss(y / 255.0, sigma), 0, 1)


def motion_blur(x, c, rng):
    radius, sigma = c
    taps = np.arange(radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    h, w = x.shape[1:3]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(x)
    for k, angle in enumerate(np.deg2rad(rng.uniform(-45, 45, size=len(x)))):
        acc = np.zeros_like(x[k])
        for t, wt in zip(taps, weights):
            coords = [yy - t * np.sin(angle), xx - t * np.cos(angle)]
            for ch in range(x.shape[-1]):
                acc[..., ch] += wt * ndimage.map_coordinates(x[k, ..., ch], coords, order=1, mode="nearest")
        out[k] = acc
    return np.clip(out, 0, 1)


def _clipped_zoom(x, factor):
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    z = ndimage.zoom(x[:, top:top + ch, top:top + ch], (1, factor, factor, 1), order=1)
    trim = (z.shape[1] - h) // 2
    return z[:, trim:trim + h, trim:trim + h]


def zoom_blur(x, c, rng):
    out = x.copy()
    for factor in c:
        out += _clipped_zoom(x, factor)
    return np.clip(out / (len(c) + 1), 0, 1)


def plasma_fractal(rng, mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square height map in [0, 1] of side ``mapsize`` (a power of two)."""
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    grid = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half:mapsize:step, half:mapsize:step] = wibbled(square)
        centre = grid[half:mapsize:step, half:mapsize:step]
        corners = grid[0:mapsize:step, 0:mapsize:step]
        grid[0:mapsize:step, half:mapsize:step] = wibbled(
            centre + np.roll(centre, 1, axis=0) + corners + np.roll(corners, -1, axis=1))
        grid[half:mapsize:step, 0:mapsize:step] = wibbled(
            centre + np.roll(centre, 1, axis=1) + corners + np.roll(corners, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min()
    return grid / grid.max()


def fog(x, c, rng):
    strength, decay = c
    h, w = x.shape[1:3]
    size = 1 << int(np.ceil(np.log2(max(h, w))))
    out = np.empty_like(x)
    for k in range(len(x)):
        peak = x[k].max()
        layer = plasma_fractal(rng, size, decay)[:h, :w, None]
        out[k] = (x[k] + strength * layer) * peak / (peak + strength)
    return np.clip(out, 0, 1)


def brightness(x, c, rng):
    hsv = rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1)


def contrast(x, c, rng):
    mean = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - mean) * c + mean, 0, 1)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix A (in x, y) with A @ [src, 1] = dst for three point pairs."""
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def elastic_transform(x, c, rng):
    """Random affine jitter of three anchor points, then a smooth random displacement field."""
    n, h, w = x.shape[:3]
    alpha, sigma, jitter = (v * h for v in c)
    centre = np.float32([h, w]) // 2
    side = min(h, w) // 3
    pts = np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(x)
    for k in range(n):
        m = _affine_from_points(pts, pts + rng.uniform(-jitter, jitter, size=pts.shape))
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))  # output pixel -> source pixel, in (x, y)
        matrix = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])  # in (row, col)
        offset = np.array([inv[1, 2], inv[0, 2]])
        warped = np.stack([ndimage.affine_transform(x[k, ..., ch], matrix, offset, order=1, mode="mirror")
                           for ch in range(x.shape[-1])], -1)
        field = [ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
                 for _ in range(2)]
        coords = [yy + field[1], xx + field[0]]
        out[k] = np.stack([ndimage.map_coordinates(warped[..., ch], coords, order=1, mode="reflect")
                           for ch in range(x.shape[-1])], -1)
    return np.clip(out, 0, 1)


def _to_pil(img):
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def pixelate(x, c, rng):
    h, w = x.shape[1:3]
    out = [np.asarray(_to_pil(img).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))
           for img in x]
    return np.stack(out).astype(x.dtype) / 255.0


def jpeg_compression(x, c, rng):
    out = []
    for img in x:
        buf = io.BytesIO()
        _to_pil(img).save(buf, "JPEG", quality=c)
        out.append(np.asarray(Image.open(buf)))
    return np.stack(out).astype(x.dtype) / 255.0


FUNCTIONS = {f.__name__: f for f in (gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur,
                                     zoom_blur, fog, brightness, contrast, elastic_transform, pixelate,
                                     jpeg_compression)}
NAMES = tuple(CIFAR)


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator,
            table: str = "cifar") -> np.ndarray:
    """Corrupt a float (N, H, W, 3) batch in [0, 1]; returns float32 in [0, 1], quantized to 8 bits."""
    constants = TABLES.get(table)
    if constants is None:
        raise ValueError(f"unknown severity table {table!r}; choose from {sorted(TABLES)}")
    if name not in constants:
        raise ValueError(f"no corruption {name!r} in the {table} table; choose from {', '.join(constants)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    out = FUNCTIONS[name](images.astype(np.float64), constants[name][severity - 1], rng)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255.0
