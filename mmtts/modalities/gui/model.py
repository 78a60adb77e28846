"""A small grounding model: screenshot and instruction in, a distribution over screen cells out.

It stands in for a vision-language model in the offline benchmark. The
screenshot is resized to ``INPUT_SIZE`` and encoded by a small
convolutional network with coordinate channels; the instruction is a bag of
hashed word embeddings that modulates the image features (FiLM) at three
scales; a 1x1 head, unfolded by a pixel shuffle, gives one logit per cell
of a ``CELLS`` grid over the screen (one cell per input pixel). Sampling a
click is sampling a cell from softmax(logits / T) and a uniform position
inside it. Having the whole distribution in closed form lets GUI-RCPO use
the exact KL to the starting policy.

:class:`ElementBoxNet` gives, from the screenshot alone, the box of the
element under every cell (distances from the cell's centre to its four
edges); :class:`BoxGrounding` pairs it with a grounding policy so that the
model answers with a box, as grounding VLMs that write ``[x1, y1, x2, y2]``
do: the box under the chosen cell (:func:`boxes_at`).

Greedy decoding can be done two ways. A vision-language model writes its
click as text, digit by digit, x before y, and greedy decoding takes the
most likely next digit each time (:func:`greedy_digits`): the hundreds digit
of x that holds the most probability mass, then the tens digit within it,
and so on. That is not the most likely point (:func:`argmax_point`), and the
gap between the two is part of what sampling and voting recover.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...core.errors import MmttsError

INPUT_SIZE = (192, 112)      # (width, height) of the image the network sees
CELLS = (192, 112)           # (columns, rows) of the output distribution: one cell per input pixel
#: the feature map is INPUT_SIZE / STRIDE; the head unfolds each of its positions into STRIDE^2 cells
STRIDE = 4
VOCAB = 2048
MAX_TOKENS = 16


def tokenize(texts: list[str]) -> torch.Tensor:
    """Words hashed to ``VOCAB - 1`` buckets (0 pads), (B, MAX_TOKENS); stable across runs and machines."""
    out = torch.zeros(len(texts), MAX_TOKENS, dtype=torch.int64)
    for i, t in enumerate(texts):
        words = re.findall(r"[a-z0-9]+", str(t).lower())[:MAX_TOKENS]
        for j, w in enumerate(words):
            out[i, j] = 1 + zlib.crc32(w.encode()) % (VOCAB - 1)
    return out


def image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images resized to INPUT_SIZE -> float (B, 3, H, W) in [0, 1]."""
    arrs = [np.asarray(im.convert("RGB").resize(INPUT_SIZE, Image.BILINEAR, reducing_gap=2.0)) for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU())


class GroundingNet(nn.Module):
    """Screenshot and instruction tokens in, logits (B, rows, cols) over the cell grid out.

    A small convolutional encoder-decoder whose feature maps are modulated
    (FiLM) by a bag-of-words embedding of the instruction.

    Args:
        width: channels of the first stage (later stages use twice as many).
        text_dim: size of the instruction's word embeddings.
    """

    def __init__(self, width: int = 32, text_dim: int = 64):
        super().__init__()
        self.cells = CELLS
        c1, c2, c3 = width, 2 * width, 2 * width
        self.embed = nn.EmbeddingBag(VOCAB, text_dim, mode="mean", padding_idx=0)
        self.text = nn.Sequential(nn.Linear(text_dim, 128), nn.SiLU())
        self.stem = nn.Sequential(nn.Conv2d(5, c1, 4, 4), nn.GroupNorm(4, c1), nn.SiLU(), _block(c1, c1, 1))  # stride 4
        self.down1 = _block(c1, c2, 2)                                                     # stride 8
        self.down2 = nn.Sequential(_block(c2, c3, 2), _block(c3, c3, 1))                   # stride 16
        self.film = nn.ModuleList([nn.Linear(128, 2 * c) for c in (c1, c2, c3)])
        self.up2 = nn.Conv2d(c3, c2, 1)
        self.up1 = nn.Conv2d(c2, c1, 1)
        self.mix = _block(c1 + 2, c1, 1)
        self.head = nn.Sequential(nn.Conv2d(c1, STRIDE * STRIDE, 1), nn.PixelShuffle(STRIDE))

    @staticmethod
    def _coords(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([xs, ys], 1)

    def _modulate(self, f: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        g, b = self.film[i](t).chunk(2, dim=1)
        return f * (1 + g[:, :, None, None]) + b[:, :, None, None]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, rows, cols) over the cell grid."""
        return self.head(self._features(images, tokens))[:, 0]

    def _features(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = self.text(self.embed(tokens))
        f1 = self._modulate(self.stem(torch.cat([images, self._coords(images)], 1)), t, 0)
        f2 = self._modulate(self.down1(f1), t, 1)
        f3 = self._modulate(self.down2(f2), t, 2)
        f2 = f2 + F.interpolate(self.up2(f3), size=f2.shape[-2:], mode="nearest")
        f1 = f1 + F.interpolate(self.up1(f2), size=f1.shape[-2:], mode="nearest")
        return self.mix(torch.cat([f1, self._coords(f1)], 1))


class ElementBoxNet(nn.Module):
    """Screenshot in, the box of the element under every cell out.

    The output is extents (B, 4, rows, cols), the distances in cells from each
    cell's centre to the element's left, top, right and bottom edges.

    Args:
        width: channels of the first stage (later stages use twice as many).
    """

    def __init__(self, width: int = 24):
        super().__init__()
        self.cells = CELLS
        c1, c2, c3 = width, 2 * width, 2 * width
        self.stem = nn.Sequential(nn.Conv2d(5, c1, 4, 4), nn.GroupNorm(4, c1), nn.SiLU(), _block(c1, c1, 1))
        self.down1 = _block(c1, c2, 2)
        self.down2 = nn.Sequential(_block(c2, c3, 2), _block(c3, c3, 1), _block(c3, c3, 1))
        self.up2 = nn.Conv2d(c3, c2, 1)
        self.up1 = nn.Conv2d(c2, c1, 1)
        self.mix = _block(c1 + 2, c1, 1)
        self.head = nn.Sequential(nn.Conv2d(c1, 4 * STRIDE * STRIDE, 1), nn.PixelShuffle(STRIDE))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f1 = self.stem(torch.cat([images, GroundingNet._coords(images)], 1))
        f2 = self.down1(f1)
        f2 = f2 + F.interpolate(self.up2(self.down2(f2)), size=f2.shape[-2:], mode="nearest")
        f1 = f1 + F.interpolate(self.up1(f2), size=f1.shape[-2:], mode="nearest")
        return F.softplus(self.head(self.mix(torch.cat([f1, GroundingNet._coords(f1)], 1))))


class BoxGrounding(nn.Module):
    """A grounding policy that answers with boxes.

    ``policy`` says where (its logits are this module's), ``boxes`` says the
    extent of the element under the chosen cell.

    Args:
        policy: the :class:`GroundingNet` that scores the cells.
        boxes: the :class:`ElementBoxNet` on the same cell grid that gives each cell's element box.
    """

    has_boxes = True

    def __init__(self, policy: GroundingNet, boxes: ElementBoxNet):
        super().__init__()
        if tuple(policy.cells) != tuple(boxes.cells):
            raise MmttsError(f"the policy's cell grid {policy.cells} and the box network's {boxes.cells} differ")
        self.policy, self.boxes = policy, boxes
        self.cells = policy.cells

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.policy(images, tokens)

    def forward_with_boxes(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, rows, cols) and extents (B, 4, rows, cols)."""
        return self.policy(images, tokens), self.boxes(images)


def boxes_at(extents: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The boxes (B, k, 4) under cell indices (B, k), as fractions of the image (x1, y1, x2, y2), from
    extents (B, 4, rows, cols) in cells (as :class:`ElementBoxNet` gives); clipped to the image."""
    b, _, rows, cols = extents.shape
    d = extents.flatten(2).double().gather(2, cells[:, None, :].expand(b, 4, -1))    # (B, 4, k)
    cx, cy = (cells % cols).double() + 0.5, (cells // cols).double() + 0.5
    box = torch.stack([(cx - d[:, 0]) / cols, (cy - d[:, 1]) / rows, (cx + d[:, 2]) / cols, (cy + d[:, 3]) / rows], -1)
    return box.clamp(0.0, 1.0)


def centres_in_box(box, size) -> tuple[np.ndarray, np.ndarray]:
    """Which columns and which rows of the cell grid have their centres inside ``box`` (x1, y1, x2, y2,
    pixels of an image of ``size`` (w, h)): boolean masks (cols,) and (rows,), edges included."""
    cols, rows = CELLS
    (x1, y1, x2, y2), (w, h) = box, size
    cx = (np.arange(cols) + 0.5) * w / cols
    cy = (np.arange(rows) + 0.5) * h / rows
    return (cx >= x1) & (cx <= x2), (cy >= y1) & (cy <= y2)


def cell_targets(boxes: np.ndarray, sizes: np.ndarray) -> torch.Tensor:
    """Training targets (B, rows, cols): uniform over the cells whose centres lie in each box
    (the nearest cell when none does)."""
    cols, rows = CELLS
    out = torch.zeros(len(boxes), rows, cols)
    for i, ((x1, y1, x2, y2), (w, h)) in enumerate(zip(boxes, sizes)):
        mx, my = centres_in_box((x1, y1, x2, y2), (w, h))
        if not mx.any():
            mx[np.clip(int((x1 + x2) / 2 / w * cols), 0, cols - 1)] = True
        if not my.any():
            my[np.clip(int((y1 + y2) / 2 / h * rows), 0, rows - 1)] = True
        m = torch.from_numpy(np.outer(my, mx).astype(np.float32))
        out[i] = m / m.sum()
    return out


def element_extents(screen_boxes, sizes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-head targets for whole screens: extents (S, 4, rows, cols) in cells from each cell's centre to
    the edges of the element whose box holds that centre, and a mask (S, rows, cols) of such cells
    (``screen_boxes``: one (n, 4) pixel array per screen; a later box wins where boxes overlap)."""
    cols, rows = CELLS
    out = torch.zeros(len(screen_boxes), 4, rows, cols)
    mask = torch.zeros(len(screen_boxes), rows, cols, dtype=torch.bool)
    for i, (boxes, (w, h)) in enumerate(zip(screen_boxes, sizes)):
        for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            mx, my = centres_in_box((x1, y1, x2, y2), (w, h))
            if not (mx.any() and my.any()):
                continue
            ix, iy = np.nonzero(mx)[0], np.nonzero(my)[0]      # contiguous: boxes are intervals
            c = np.broadcast_to(ix + 0.5, (len(iy), len(ix)))
            r = np.broadcast_to(iy[:, None] + 0.5, (len(iy), len(ix)))
            ext = np.stack([c - x1 * cols / w, r - y1 * rows / h, x2 * cols / w - c, y2 * rows / h - r])
            out[i, :, iy[0]:iy[-1] + 1, ix[0]:ix[-1] + 1] = torch.from_numpy(ext.astype(np.float32))
            mask[i, iy[0]:iy[-1] + 1, ix[0]:ix[-1] + 1] = True
    return out, mask


def _permille_mass(cell_probs: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) probabilities of n equal cells along an axis -> (B, 1000) of each thousandth."""
    v = torch.arange(1000)
    cell = v * n // 1000
    count = torch.bincount(cell, minlength=n)
    return cell_probs[:, cell] / count[cell]


def _greedy_number(p: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of a three-digit number 0..999 from its distribution (B, 1000), one digit at a time."""
    rows = torch.arange(len(p))
    hundreds = p.reshape(-1, 10, 100).sum(2).argmax(1)
    within = p.reshape(-1, 10, 100)[rows, hundreds]
    tens = within.reshape(-1, 10, 10).sum(2).argmax(1)
    ones = within.reshape(-1, 10, 10)[rows, tens].argmax(1)
    return hundreds * 100 + tens * 10 + ones


def greedy_digits(logits: torch.Tensor) -> torch.Tensor:
    """Digit-by-digit greedy decoding of "(x, y)" in thousandths, x first: (B, rows, cols) logits -> (B, 2) ints."""
    b, rows, cols = logits.shape
    p = torch.softmax(logits.reshape(b, -1).double(), 1).reshape(b, rows, cols)
    x = _greedy_number(_permille_mass(p.sum(1), cols))
    column = p[torch.arange(b), :, x * cols // 1000]
    y = _greedy_number(_permille_mass(column / column.sum(1, keepdim=True), rows))
    return torch.stack([x, y], 1)


def argmax_point(logits: torch.Tensor) -> torch.Tensor:
    """The centre of the most likely cell, as fractions of the image: (B, rows, cols) -> (B, 2)."""
    return cells_to_unit(logits.flatten(1).argmax(1))


def sample_cells(logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """k cell indices (B, k) per distribution; temperature 0 is the argmax, repeated."""
    flat = logits.reshape(len(logits), -1)
    if temperature == 0:
        return flat.argmax(1, keepdim=True).expand(-1, k)
    probs = torch.softmax(flat.double() / temperature, dim=1)
    return torch.multinomial(probs, k, replacement=True, generator=generator)


def cells_at(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cells (B, k) drawn from softmax(logits / T) by inverse CDF at ``uniforms`` (B, k) in [0, 1).

    Draw j is a function of its own uniform alone, so a candidate with its
    own random stream gets the same cell however many others are drawn
    beside it. Temperature 0 is the argmax, repeated.
    """
    flat = logits.reshape(len(logits), -1)
    if temperature == 0:
        return flat.argmax(1, keepdim=True).expand(-1, uniforms.shape[1])
    cdf = torch.softmax(flat.double() / temperature, dim=1).cumsum(1)
    # the first cell whose cumulative mass exceeds u * total: cells of zero mass are never chosen
    cells = torch.searchsorted(cdf, uniforms.double() * cdf[:, -1:], right=True)
    return cells.clamp_(max=flat.shape[1] - 1)


def cells_to_unit(cells: torch.Tensor, jitter: torch.Tensor | None = None,
                  grid: tuple[int, int] = CELLS) -> torch.Tensor:
    """Cell indices (...) of a (columns, rows) grid -> (..., 2) points as fractions of the image;
    ``jitter`` in [0, 1)^2 places the point inside the cell (None: its centre)."""
    cols, rows = grid
    cx, cy = (cells % cols).double(), (cells // cols).double()
    off = torch.full((*cells.shape, 2), 0.5, dtype=torch.float64) if jitter is None else jitter.double()
    return torch.stack([(cx + off[..., 0]) / cols, (cy + off[..., 1]) / rows], -1)
