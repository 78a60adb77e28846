"""Grounding examples and the loaders of the public formats, all into one example type.

Formats (one example per annotation, boxes converted to pixel corners):

- ScreenSpot v1 and v2: a JSON list of ``{"img_filename", "instruction",
  "bbox": [x, y, w, h] in pixels, "data_type": "text"|"icon",
  "data_source": platform}``; the image size is read from the image header.
- ScreenSpot-Pro: a JSON list of ``{"img_filename", "instruction",
  "bbox": [x1, y1, x2, y2] in pixels, "img_size": [w, h], "ui_type",
  "platform", "application"}``.
- GUI-RCPO jsonl: one object per line, ``{"image", "instruction",
  "bbox": [x1, y1, x2, y2] as fractions of the image}`` (also read:
  ``problem`` for the instruction, ``solution`` for the box); the box may be
  absent, since test-time RL never reads labels.

The metric is GUI grounding's usual one: a prediction is correct when its
point falls inside the target box, reported overall and split by element
type and platform.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ...core.errors import MmttsError


@dataclass
class GroundingExample:
    """One instruction on one screenshot.

    Attributes:
        image: the screenshot, as a path or a PIL image.
        instruction: the text naming the element to find.
        image_size: (width, height) of the screenshot in pixels.
        box: the target element's (x1, y1, x2, y2) in pixels, or None when unlabeled.
        element_type: the kind of element the metric splits by, ``"unknown"`` if not given.
        platform: the platform the screenshot comes from, ``"unknown"`` if not given.
        id: an identifier of the example.
        meta: any further fields of the source record.
    """

    image: str | Path | Image.Image
    instruction: str
    image_size: tuple[int, int]
    box: tuple[float, float, float, float] | None = None
    element_type: str = "unknown"
    platform: str = "unknown"
    id: str = ""
    meta: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        path = Path(self.image)
        if not path.exists():
            raise MmttsError(f"screenshot {path} of example {self.id or self.instruction!r} does not exist; "
                             "pass the folder holding the images as image_dir")
        with Image.open(path) as im:
            return im.convert("RGB")


def _read_json_list(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise MmttsError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MmttsError(f"{path} is not valid JSON ({e}); ScreenSpot annotations are one JSON list") from None
    if not isinstance(data, list):
        raise MmttsError(f"{path} holds a JSON {type(data).__name__}; ScreenSpot annotations are a JSON list")
    return data


def _need(rec: dict, keys: Sequence[str], where: str):
    for k in keys:
        if k in rec:
            return rec[k]
    raise MmttsError(f"{where} has no {' or '.join(repr(k) for k in keys)} field; its fields are {sorted(rec)}")


def _image_size(path: Path) -> tuple[int, int]:
    if not path.exists():
        raise MmttsError(f"screenshot {path} does not exist; pass the folder holding the images as image_dir")
    with Image.open(path) as im:
        return im.size


def _check_box(box, size, where: str) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        raise MmttsError(f"{where}: target box {list(box)} has no area (need x2 > x1 and y2 > y1)")
    return x1, y1, x2, y2


def load_screenspot(annotations: str | os.PathLike, image_dir: str | os.PathLike,
                    platform: str | None = None) -> list[GroundingExample]:
    """ScreenSpot v1/v2 (boxes as x, y, w, h in pixels). ``platform`` overrides ``data_source``."""
    image_dir = Path(image_dir)
    out = []
    for i, rec in enumerate(_read_json_list(annotations)):
        where = f"{annotations} item {i}"
        path = image_dir / _need(rec, ("img_filename",), where)
        x, y, w, h = (float(v) for v in _need(rec, ("bbox",), where))
        size = _image_size(path)
        out.append(GroundingExample(
            image=path, instruction=str(_need(rec, ("instruction",), where)), image_size=size,
            box=_check_box((x, y, x + w, y + h), size, where), element_type=str(rec.get("data_type", "unknown")),
            platform=str(platform or rec.get("data_source", "unknown")), id=str(rec.get("id", f"{i}"))))
    return out


def load_screenspot_pro(annotations: str | os.PathLike, image_dir: str | os.PathLike) -> list[GroundingExample]:
    """ScreenSpot-Pro (boxes as x1, y1, x2, y2 in pixels, with the image size)."""
    image_dir = Path(image_dir)
    out = []
    for i, rec in enumerate(_read_json_list(annotations)):
        where = f"{annotations} item {i}"
        size = tuple(int(v) for v in _need(rec, ("img_size",), where))
        out.append(GroundingExample(
            image=image_dir / _need(rec, ("img_filename",), where),
            instruction=str(_need(rec, ("instruction",), where)),
            image_size=size, box=_check_box(_need(rec, ("bbox",), where), size, where),
            element_type=str(rec.get("ui_type", "unknown")), platform=str(rec.get("platform", "unknown")),
            id=str(rec.get("id", f"{i}")), meta={"application": rec.get("application")}))
    return out


def load_rcpo_jsonl(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[GroundingExample]:
    """GUI-RCPO jsonl (box corners as fractions of the image; optional)."""
    path = Path(path)
    if not path.exists():
        raise MmttsError(f"jsonl file {path} does not exist")
    image_dir = Path(image_dir) if image_dir is not None else path.parent
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MmttsError(f"{where} is not a JSON object ({e}); a jsonl file holds one object per line") from None
        img = image_dir / _need(rec, ("image", "img_filename", "image_path"), where)
        size = _image_size(img)
        box = rec.get("bbox", rec.get("solution"))
        if box is not None:
            b = np.asarray(box, dtype=np.float64)
            if b.shape != (4,) or b.min() < 0 or b.max() > 1:
                raise MmttsError(f"{where}: bbox {box} must be four fractions of the image in [0, 1] "
                                 "(x1, y1, x2, y2 divided by width and height)")
            box = _check_box(b * [size[0], size[1], size[0], size[1]], size, where)
        out.append(GroundingExample(
            image=img, instruction=str(_need(rec, ("instruction", "problem"), where)), image_size=size, box=box,
            element_type=str(rec.get("data_type", "unknown")), platform=str(rec.get("platform", "unknown")),
            id=str(rec.get("id", f"{i}"))))
    return out


def write_screenspot(examples: Sequence[GroundingExample], annotations: str | os.PathLike) -> Path:
    """Write labelled examples whose images are files as a ScreenSpot v2 annotation list (image names relative)."""
    annotations = Path(annotations)
    recs = []
    for ex in examples:
        if ex.box is None:
            raise MmttsError(f"example {ex.id!r} has no box; ScreenSpot annotations need one")
        x1, y1, x2, y2 = ex.box
        recs.append({"img_filename": Path(ex.image).name, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "instruction": ex.instruction, "data_type": ex.element_type, "data_source": ex.platform,
                     "id": ex.id})
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(recs, indent=1))
    return annotations


def point_in_box(points, boxes) -> np.ndarray:
    """Whether each point (N, 2) lies in its box (N, 4), edges included; NaN points are misses."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(p) != len(b):
        raise MmttsError(f"{len(p)} points for {len(b)} boxes; pass one prediction per example")
    with np.errstate(invalid="ignore"):
        return (p[:, 0] >= b[:, 0]) & (p[:, 0] <= b[:, 2]) & (p[:, 1] >= b[:, 1]) & (p[:, 1] <= b[:, 3])


def grounding_accuracy(examples: Sequence[GroundingExample], points) -> dict[str, float]:
    """Point-in-box accuracy overall and by element type and platform ("type/text", "platform/web")."""
    if any(ex.box is None for ex in examples):
        raise MmttsError("accuracy needs labelled examples; some have box=None")
    hits = point_in_box(points, [ex.box for ex in examples])
    out = {"accuracy": float(hits.mean()) if len(hits) else float("nan")}
    groups: dict[str, list[bool]] = defaultdict(list)
    for ex, h in zip(examples, hits):
        groups[f"type/{ex.element_type}"].append(bool(h))
        groups[f"platform/{ex.platform}"].append(bool(h))
    out.update({k: float(np.mean(v)) for k, v in sorted(groups.items())})
    return out
