"""Procedural screenshots with known element boxes, and instructions that refer to those elements.

A screen is a desktop with one application window: a title bar (its
window controls on the right, Windows style, or as round lights on the
left, macOS style), a toolbar of coloured icons, a side menu of text
items, a list panel, and a row of text buttons at the bottom. Sizes scale
with the resolution; light and dark themes change every colour.
Instructions refer to an element in one of three ways:

- ``text``: by its label ("click the 'Export' button"),
- ``icon``: by the icon's colour and shape ("the red star icon"),
- ``position``: by where it is ("the third item of the side menu",
  "close the window"),

which is the ``element_type`` the metric splits by. Everything is a pure
function of a seed, so a benchmark's data is the same on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RESOLUTIONS = ((1280, 720), (1440, 900), (1920, 1080), (2560, 1440))
PLATFORMS = ("windows", "macos")
WORDS = ("Open", "Save", "Export", "Print", "Share", "Settings", "Help", "Cancel", "Apply", "Delete", "Rename",
         "Copy", "Paste", "Search", "Upload", "Download", "Refresh", "Filter", "Sort", "Archive", "Edit", "View",
         "Insert", "Format", "Tools", "Account", "Profile", "Logout", "Home", "Back")
ICON_COLORS = {"red": (220, 50, 47), "green": (40, 160, 60), "blue": (38, 110, 220), "orange": (245, 140, 20),
               "purple": (140, 70, 200), "teal": (20, 170, 170)}
ICON_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
THEMES = {
    "light": {"desktop": (90, 120, 160), "window": (245, 245, 245), "title": (225, 225, 228), "text": (20, 20, 20),
              "panel": (235, 236, 240), "button": (210, 215, 225), "line": (200, 200, 205)},
    "dark": {"desktop": (30, 40, 55), "window": (40, 42, 48), "title": (28, 30, 34), "text": (230, 230, 230),
             "panel": (50, 52, 58), "button": (70, 75, 88), "line": (75, 78, 85)},
}


@dataclass
class Element:
    """One element drawn on a procedural screen.

    Attributes:
        box: (x1, y1, x2, y2) of the element in pixels.
        role: its kind: ``"control"``, ``"icon"``, ``"menu"``, ``"row"`` or ``"button"``.
        label: its text, if any.
        color: its colour name (icons).
        shape: its shape name (icons).
        index: its position within its group.
        count: the size of its group.
    """

    box: tuple[int, int, int, int]
    role: str          # "control", "icon", "menu", "row", "button"
    label: str = ""
    color: str = ""
    shape: str = ""
    index: int = 0     # position within its group
    count: int = 1     # size of its group


@dataclass
class Screen:
    """A rendered screenshot and the elements on it.

    Attributes:
        image: the screenshot.
        elements: the elements drawn, with their boxes.
        platform: the platform whose look was drawn.
        theme: the colour theme, ``"light"`` or ``"dark"``.
    """

    image: Image.Image
    elements: list[Element]
    platform: str
    theme: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _font(px: float) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, int(round(px))))


def _draw_icon(d: ImageDraw.ImageDraw, box, shape: str, color) -> None:
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.36
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "star":
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=color)
    else:  # cross
        t = r * 0.35
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)


def render_screen(seed: int, size: tuple[int, int] | None = None) -> Screen:
    """One screenshot and its elements, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size or RESOLUTIONS[rng.integers(len(RESOLUTIONS))]
    platform = PLATFORMS[rng.integers(len(PLATFORMS))]
    theme_name = ("light", "dark")[rng.integers(2)]
    th = THEMES[theme_name]
    s = h / 1080 * rng.uniform(0.9, 1.15)
    img = Image.new("RGB", (w, h), th["desktop"])
    d = ImageDraw.Draw(img)
    els: list[Element] = []
    # the window
    wx1, wy1 = int(rng.uniform(0.01, 0.06) * w), int(rng.uniform(0.01, 0.05) * h)
    wx2, wy2 = w - int(rng.uniform(0.01, 0.06) * w), h - int(rng.uniform(0.02, 0.06) * h)
    d.rectangle([wx1, wy1, wx2, wy2], fill=th["window"], outline=th["line"])
    tb = int(34 * s)
    d.rectangle([wx1, wy1, wx2, wy1 + tb], fill=th["title"])
    title_font = _font(15 * s)
    title = str(rng.choice(WORDS)) + " - " + str(rng.choice(WORDS))
    d.text(((wx1 + wx2) / 2, wy1 + tb / 2), title, font=title_font, fill=th["text"], anchor="mm")
    controls = ("close", "minimize", "maximize")
    if platform == "windows":
        bw = int(46 * s)
        for i, name in enumerate(("minimize", "maximize", "close")):
            bx1 = wx2 - (3 - i) * bw
            box = (bx1, wy1, bx1 + bw, wy1 + tb)
            if name == "close":
                d.rectangle(box, fill=(196, 43, 28))
            cx, cy, r = bx1 + bw / 2, wy1 + tb / 2, 6 * s
            col = (255, 255, 255) if name == "close" else th["text"]
            if name == "minimize":
                d.line([cx - r, cy, cx + r, cy], fill=col, width=max(1, int(s)))
            elif name == "maximize":
                d.rectangle([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(1, int(s)))
            else:
                d.line([cx - r, cy - r, cx + r, cy + r], fill=col, width=max(1, int(1.5 * s)))
                d.line([cx - r, cy + r, cx + r, cy - r], fill=col, width=max(1, int(1.5 * s)))
            els.append(Element(box, "control", label=name, index=controls.index(name), count=3))
    else:
        lights = {"close": (255, 95, 86), "minimize": (255, 189, 46), "maximize": (39, 201, 63)}
        r = 7 * s
        for i, name in enumerate(controls):
            cx, cy = wx1 + 18 * s + i * 22 * s, wy1 + tb / 2
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=lights[name])
            box = (int(cx - r - 2 * s), int(cy - r - 2 * s), int(cx + r + 2 * s), int(cy + r + 2 * s))
            els.append(Element(box, "control", label=name, index=i, count=3))
    # the toolbar of icons
    ty1, ty2 = wy1 + tb, wy1 + tb + int(48 * s)
    d.rectangle([wx1, ty1, wx2, ty2], fill=th["panel"])
    n_icons = int(rng.integers(5, 10))
    combos = [(c, sh) for c in ICON_COLORS for sh in ICON_SHAPES]
    pick = rng.choice(len(combos), n_icons, replace=False)
    isz, gap = int(40 * s), int(rng.uniform(6, 16) * s)
    x = wx1 + int(10 * s)
    for i, ci in enumerate(pick):
        color, shape = combos[ci]
        box = (x, ty1 + int(4 * s), x + isz, ty1 + int(4 * s) + isz)
        _draw_icon(d, box, shape, ICON_COLORS[color])
        els.append(Element(box, "icon", color=color, shape=shape, index=i, count=n_icons))
        x += isz + gap
    # the side menu
    font = _font(16 * s)
    mx2 = wx1 + int(rng.uniform(180, 240) * s)
    d.rectangle([wx1, ty2, mx2, wy2], fill=th["panel"])
    words = list(rng.choice(WORDS, size=len(WORDS), replace=False))
    n_menu = int(rng.integers(4, 9))
    ih = int(36 * s)
    y = ty2 + int(12 * s)
    for i in range(n_menu):
        word = words.pop()
        box = (wx1 + int(6 * s), y, mx2 - int(6 * s), y + ih)
        d.text((box[0] + 12 * s, y + ih / 2), word, font=font, fill=th["text"], anchor="lm")
        els.append(Element(box, "menu", label=word, index=i, count=n_menu))
        y += ih + int(4 * s)
    # the list panel on the right
    lx1 = wx2 - int(rng.uniform(300, 420) * s)
    d.rectangle([lx1, ty2 + int(12 * s), wx2 - int(12 * s), wy2 - int(80 * s)], fill=th["panel"], outline=th["line"])
    n_rows = int(rng.integers(4, 9))
    rh = int(32 * s)
    y = ty2 + int(20 * s)
    for i in range(n_rows):
        word = words.pop()
        box = (lx1 + int(6 * s), y, wx2 - int(18 * s), y + rh)
        if i % 2 == 1:
            d.rectangle(box, fill=th["window"])
        d.text((box[0] + 10 * s, y + rh / 2), f"{word}.txt", font=font, fill=th["text"], anchor="lm")
        els.append(Element(box, "row", label=word, index=i, count=n_rows))
        y += rh
    # the button row
    n_buttons = int(rng.integers(2, 6))
    bh = int(36 * s)
    by1 = wy2 - int(60 * s)
    x = wx2 - int(20 * s)
    buttons = []
    for i in range(n_buttons):
        word = words.pop()
        bw = int(font.getlength(word) + 40 * s)
        box = (x - bw, by1, x, by1 + bh)
        d.rounded_rectangle(box, radius=int(5 * s), fill=th["button"], outline=th["line"])
        d.text(((box[0] + box[2]) / 2, by1 + bh / 2), word, font=font, fill=th["text"], anchor="mm")
        buttons.append((box, word))
        x -= bw + int(12 * s)
    for i, (box, word) in enumerate(reversed(buttons)):
        els.append(Element(box, "button", label=word, index=i, count=n_buttons))
    return Screen(img, els, platform, theme_name)


def _ordinal(i: int, n: int) -> str:
    return "last" if i == n - 1 and i > 0 else ORDINALS[i]


def describe(el: Element, kind: str) -> str:
    """An instruction for ``el`` of reference ``kind`` (text, icon or position)."""
    if kind == "icon":
        return f"click the {el.color} {el.shape} icon in the toolbar"
    if kind == "text":
        where = {"menu": "in the side menu", "row": "in the file list", "button": "button"}[el.role]
        return f"click '{el.label}' {where}" if el.role != "button" else f"click the '{el.label}' button"
    if el.role == "control":
        return f"{el.label} the window"
    group = {"menu": "item of the side menu", "row": "file in the list", "button": "button at the bottom",
             "icon": "icon in the toolbar"}[el.role]
    return f"click the {_ordinal(el.index, el.count)} {group}"


def reference_kinds(el: Element) -> tuple[str, ...]:
    if el.role == "icon":
        return ("icon", "position")
    if el.role == "control":
        return ("position",)
    return ("text", "position")


def instructions(screen: Screen, n: int, rng: np.random.Generator) -> list[tuple[Element, str, str]]:
    """``n`` distinct (element, reference kind, instruction) triples for a screen, kinds roughly balanced."""
    options = [(el, k) for el in screen.elements for k in reference_kinds(el)]
    by_kind: dict[str, list] = {}
    for el, k in options:
        by_kind.setdefault(k, []).append(el)
    out, used = [], set()
    kinds = sorted(by_kind)
    for j in range(n):
        kind = kinds[(j + int(rng.integers(len(kinds)))) % len(kinds)]
        pool = [el for el in by_kind[kind] if (id(el), kind) not in used]
        if not pool:
            continue
        el = pool[int(rng.integers(len(pool)))]
        used.add((id(el), kind))
        out.append((el, kind, describe(el, kind)))
    return out
