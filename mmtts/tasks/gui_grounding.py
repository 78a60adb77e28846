"""gui-grounding: GUI-RC region voting and GUI-RCPO test-time RL on procedural screenshots, offline.

Each seed renders its own test screens (:mod:`mmtts.modalities.gui.render`:
windows, title bars, toolbars of icons, side menus, file lists and buttons
at four resolutions, two platforms and two themes), writes them as
ScreenSpot v2 files (PNG screenshots and a JSON annotation list) and reads
them back with the ScreenSpot loader, so the benchmark runs on exactly the
files a user's ScreenSpot folder would hold. Instructions refer to
elements by text, by icon and by position.

The grounding model is the project's small :class:`GroundingNet`, trained
on other procedural screens and cached; for box answers it is paired with
an :class:`ElementBoxNet` that gives the box of the element under any
cell, trained once on the same screens. Four settings differ in the model and in
how it answers: ``default`` is trained for 4000 steps and answers with a
click "(x, y)"; ``short-training`` follows the same recipe for 600 steps,
a weaker and less certain model; ``boxes`` and ``boxes-short-training``
are the same two models answering with the box under their click,
"[x1, y1, x2, y2]", as grounding VLMs that write boxes do. With clicks,
region voting's alpha-squares cut across elements; with boxes, every
answer votes for a whole element and the consensus is the element that
holds the most samples.
The sampling temperature is chosen per setting on validation seeds
(100-102, never in the reported table); ``--option temperature=T``
overrides all of them.
Methods, at a budget of K samples:

- ``greedy``: greedy decoding of the answer, digit by digit as a
  vision-language model writes it (K is not used);
- ``argmax``: the model's single most likely click, which a VLM cannot
  compute; shown so that what voting recovers can be read against it;
- ``gui-rc``: K clicks at ``temperature``, each from its own random
  stream, region voting with boxes of side ``alpha`` pixels (the
  ``region-vote`` strategy through ``run_strategy``, no verifier), the
  baseline;
- ``gui-rcpo``: the model after GUI-RCPO on the seed's unlabeled test
  prompts (``rcpo_epochs`` passes, ``rcpo_samples`` clicks per prompt),
  then greedy;
- ``gui-rcpo+rc``: region voting with K samples of the adapted model.

Metrics: ``accuracy`` (click inside the target box), the same split by
reference kind (``acc_text``, ``acc_icon``, ``acc_position``),
``parse_rate`` (answers that parsed, a real VLM's failure mode) and
``ms_per_example`` (wall time, adaptation included, on this machine).

``gui-grounding-vlm`` (:class:`GUIGroundingVLM`) runs the same screens and
methods (without ``argmax``) on a transformers VLM that answers in text,
trained here (:mod:`mmtts.modalities.gui.vlm`), at T = 0.5 and T = 1: one
model that writes a click, one that writes the target element's box.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..adapters.gui_rcpo import GUIRCPO
from ..core.errors import MmttsError
from ..core.registry import TASKS
from ..core.rng import derive_seed
from ..core.strategy import run_strategy
from ..core.threads import one_thread
from ..modalities.gui.data import GroundingExample, grounding_accuracy, load_screenspot, write_screenspot
from ..modalities.gui.elements import DetectedElements, ElementProposals
from ..modalities.gui.model import INPUT_SIZE, BoxGrounding, ElementBoxNet, GroundingNet, image_tensor, tokenize
from ..modalities.gui.parse import parse_answers
from ..modalities.gui.process import ClickProcess
from ..modalities.gui.render import instructions, render_screen
from ..modalities.gui.sampler import HeatmapSampler, TransformersSampler
from ..modalities.gui.train import train_element_boxes, train_grounding
from ..modalities.gui.vlm import (BOX_VLM_CONFIG, MAX_NEW_TOKENS, PROMPT, QUICK_BOX_VLM_CONFIG, QUICK_VLM_CONFIG,
                                  VLM_CONFIG, build_processor, build_vlm)
from ..modalities.gui.vlm_train import train_vlm
from ..strategies.region_vote import RegionVote
from .base import Task
from .cache import config_hash

MODEL_CONFIG = {"arch": "grounding-net", "width": 24, "screens": 2000, "per_screen": 8, "steps": 4000,
                "batch": 32, "lr": 3e-3, "seed": 0}
QUICK_MODEL_CONFIG = {**MODEL_CONFIG, "screens": 40, "steps": 40}
_SHORT = {**MODEL_CONFIG, "steps": 600}
_QUICK_SHORT = {**QUICK_MODEL_CONFIG, "steps": 20}
#: the model each setting uses, full and quick, and how it answers (a click or a box)
SETTING_MODELS = {"default": MODEL_CONFIG, "short-training": _SHORT, "boxes": MODEL_CONFIG,
                  "boxes-short-training": _SHORT}
QUICK_SETTING_MODELS = {"default": QUICK_MODEL_CONFIG, "short-training": _QUICK_SHORT, "boxes": QUICK_MODEL_CONFIG,
                        "boxes-short-training": _QUICK_SHORT}
#: the box network of the box settings (one for both), full and quick
BOX_CONFIG = {"arch": "element-box-net", "width": 24, "screens": 2000, "steps": 4000, "batch": 32, "lr": 3e-3, "seed": 0}
QUICK_BOX_CONFIG = {**BOX_CONFIG, "screens": 40, "steps": 40}
SETTING_ANSWER = {"default": "point", "short-training": "point", "boxes": "box", "boxes-short-training": "box"}
#: sampling temperature per setting, chosen on validation seeds 100-102
SETTING_TEMPERATURE = {"default": 0.5, "short-training": 1.0, "boxes": 0.5, "boxes-short-training": 0.5}
#: test screens come from seeds far from the training screens'
TEST_OFFSET = 1 << 40
KINDS = ("text", "icon", "position")


@TASKS.register("gui-grounding")
class GUIGrounding(Task):
    """GUI grounding on procedural screenshots: greedy vs GUI-RC region voting vs GUI-RCPO test-time RL.

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version for a fast check.
        **options: ``screens`` (screens per seed; 8 when quick), ``per_screen`` (instructions
            per screen), ``temperature`` (sampling temperature; None for the per-setting default),
            ``alpha`` (side in pixels of region voting's boxes), and GUI-RCPO's ``rcpo_samples``
            (clicks per prompt), ``rcpo_epochs``, ``rcpo_prompts``, ``rcpo_lr`` and ``rcpo_beta``.
    """

    description = "GUI grounding on procedural screenshots: greedy vs GUI-RC region voting vs GUI-RCPO test-time RL"
    methods = ("greedy", "argmax", "gui-rc", "gui-rcpo", "gui-rcpo+rc")
    baseline = "gui-rc"
    settings = tuple(SETTING_MODELS)
    primary_metric = "accuracy"
    budget_unit = "samples"
    default_budgets = (8, 16, 32, 64)
    quick_budgets = (8,)
    option_defaults = {"screens": 100, "per_screen": 3, "temperature": None, "alpha": 50.0, "rcpo_samples": 16,
                       "rcpo_epochs": 3, "rcpo_prompts": 16, "rcpo_lr": 3e-5, "rcpo_beta": 0.1}

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        if self.quick and "screens" not in options:
            self.options["screens"] = 8
        if self.options["screens"] < 1 or self.options["per_screen"] < 1:
            raise MmttsError("gui-grounding needs screens >= 1 and per_screen >= 1")
        t = self.options["temperature"]
        if t is not None:
            try:
                self.options["temperature"] = float(t)
            except (TypeError, ValueError):
                raise MmttsError(f"gui-grounding temperature must be a number (got {t!r})") from None
            if not self.options["temperature"] > 0:
                raise MmttsError(f"gui-grounding needs temperature > 0 (got {t}); omit it for the per-setting default")
        self.model_configs = QUICK_SETTING_MODELS if quick else SETTING_MODELS
        self._models: dict[str, GroundingNet | BoxGrounding] = {}
        self._data: dict[int, tuple[list[GroundingExample], list[Image.Image]]] = {}
        self._adapted: dict[tuple[str, int], tuple[GroundingNet, float]] = {}
        self._box_model: ElementBoxNet | None = None

    # -- the model and the data ---------------------------------------------------------------
    def prepare(self) -> list[str]:
        for setting in self.settings:
            self.model(setting)
        return [f"gui-grounding-net ({setting})" for setting in self.settings] + ["gui-element-boxes"]

    def model(self, setting: str = "default") -> GroundingNet | BoxGrounding:
        """The grounding model of ``setting``, trained once and cached (with the box network for box answers)."""
        self.check_setting(setting)
        if setting not in self._models:
            cfg = self.model_configs[setting]
            state = self.cache.load_or_train("gui-grounding-net", cfg, lambda: train_grounding(cfg))
            net = GroundingNet(cfg["width"])
            net.load_state_dict(state)
            if SETTING_ANSWER[setting] == "box":
                net = BoxGrounding(net, self.box_model())
            self._models[setting] = net.eval()
        return self._models[setting]

    def box_model(self) -> ElementBoxNet:
        """The element-box network of the box settings (one for both), trained once and cached."""
        if self._box_model is None:
            cfg = QUICK_BOX_CONFIG if self.quick else BOX_CONFIG
            state = self.cache.load_or_train("gui-element-boxes", cfg, lambda: train_element_boxes(cfg))
            self._box_model = ElementBoxNet(cfg["width"])
            self._box_model.load_state_dict(state)
            self._box_model.eval()
        return self._box_model

    def temperature(self, setting: str) -> float:
        """The sampling temperature of ``setting``: the option when given, else the setting's default."""
        t = self.options["temperature"]
        return SETTING_TEMPERATURE[setting] if t is None else t

    def data_dir(self, seed: int) -> Path:
        spec = {"screens": self.options["screens"], "per_screen": self.options["per_screen"], "seed": seed}
        return self.cache.root / "gui-grounding-data" / config_hash(spec)

    def data(self, seed: int) -> tuple[list[GroundingExample], list[Image.Image]]:
        """The seed's test examples, read back from ScreenSpot files, and their images at model resolution."""
        if seed not in self._data:
            folder = self.data_dir(seed)
            ann = folder / "screenspot.json"
            if not ann.exists():
                self._write_screens(seed, folder)
            examples = load_screenspot(ann, folder / "images")
            thumbs: dict[str, Image.Image] = {}
            for ex in examples:
                if str(ex.image) not in thumbs:
                    with Image.open(ex.image) as im:
                        thumbs[str(ex.image)] = self.model_input(im.convert("RGB"))
            self._data[seed] = (examples, [thumbs[str(ex.image)] for ex in examples])
        return self._data[seed]

    def model_input(self, image: Image.Image):
        """A screenshot as the model takes it: resized to ``INPUT_SIZE``."""
        return image.resize(INPUT_SIZE, Image.BILINEAR, reducing_gap=2.0)

    def _write_screens(self, seed: int, folder: Path) -> None:
        rng = np.random.default_rng(derive_seed(seed, 0x6E1))
        tmp = folder.with_name(folder.name + f".tmp{time.time_ns()}")
        (tmp / "images").mkdir(parents=True)
        examples = []
        for s in range(self.options["screens"]):
            screen = render_screen(derive_seed(TEST_OFFSET, seed, s))
            path = tmp / "images" / f"screen_{s:04d}.png"
            screen.image.save(path, compress_level=1)
            for j, (el, kind, text) in enumerate(instructions(screen, self.options["per_screen"], rng)):
                examples.append(GroundingExample(image=path, instruction=text, image_size=screen.size, box=el.box,
                                                 element_type=kind, platform=screen.platform, id=f"{s}-{j}"))
        write_screenspot(examples, tmp / "screenspot.json")
        if folder.exists():  # another process wrote the same data first
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)

    # -- methods ---------------------------------------------------------------------------------
    def adapted(self, seed: int, setting: str = "default") -> tuple[GroundingNet, float]:
        """The model after GUI-RCPO on the seed's test prompts (labels never read), and the seconds it took."""
        if (setting, seed) not in self._adapted:
            examples, thumbs = self.data(seed)
            o = self.options
            t0 = time.perf_counter()
            adapter = GUIRCPO(copy.deepcopy(self.model(setting)), n=o["rcpo_samples"],
                              temperature=self.temperature(setting),
                              alpha=o["alpha"], beta=o["rcpo_beta"], lr=o["rcpo_lr"], seed=seed,
                              answers=SETTING_ANSWER[setting],
                              include=["policy.*"] if SETTING_ANSWER[setting] == "box" else None)
            images = image_tensor(thumbs)
            tokens = tokenize([ex.instruction for ex in examples])
            sizes = torch.tensor([ex.image_size for ex in examples], dtype=torch.float64)
            g = torch.Generator().manual_seed(derive_seed(seed, 0x12C0))
            n, p = len(examples), o["rcpo_prompts"]
            with one_thread():
                for _ in range(o["rcpo_epochs"]):
                    order = torch.randperm(n, generator=g)
                    for start in range(0, n, p):
                        idx = order[start:start + p]
                        adapter({"images": images[idx], "tokens": tokens[idx], "sizes": sizes[idx], "ids": idx})
            self._adapted[setting, seed] = (adapter.release().eval(), time.perf_counter() - t0)
        return self._adapted[setting, seed]

    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        self.check_method(method)
        self.check_setting(setting)
        examples, thumbs = self.data(seed)
        sampler, extra = self.sampler(method, setting, seed)
        voting = method.endswith("rc")
        k, alpha, temp = int(budget), self.options["alpha"], self.temperature(setting)
        points, parsed, answers = [], 0, 0
        t0 = time.perf_counter()
        with one_thread():
            for i, (ex, thumb) in enumerate(zip(examples, thumbs)):
                rseed = derive_seed(seed, i)
                elements = self.elements(setting, ex)
                if voting:
                    process = ClickProcess(sampler, thumb, ex.instruction, ex.image_size, temp, elements=elements)
                    res = run_strategy(RegionVote(n=k, alpha=alpha, snap=elements is not None), process, None,
                                       budget=k, seed=rseed)
                    points.append(res.outputs[0].numpy())
                    parsed += int(res.population["parsed"].sum())
                    answers += k
                else:
                    answer = sampler.sample(thumb, ex.instruction, [rseed], 0.0)
                    p = parse_answers(answer, sampler.space, ex.image_size)
                    points.append(p.points[0] if elements is None else elements.snap(p.points)[0])
                    parsed += int(p.ok.sum())
                    answers += 1
        seconds = time.perf_counter() - t0 + extra
        acc = grounding_accuracy(examples, np.stack(points))
        out = {"accuracy": acc["accuracy"]}
        for kind in KINDS:
            out[f"acc_{kind}"] = acc.get(f"type/{kind}", float("nan"))
        out["parse_rate"] = parsed / answers
        out["ms_per_example"] = 1000.0 * seconds / len(examples)
        return out

    def elements(self, setting: str, example: GroundingExample) -> ElementProposals | None:
        """Where the elements of ``example``'s screenshot are, for settings that snap answers onto them; None
        (the default: no setting of this task snaps)."""
        return None

    def sampler(self, method: str, setting: str, seed: int) -> tuple[HeatmapSampler, float]:
        """The sampler ``method`` answers with, and the seconds its adaptation took (0 without GUI-RCPO)."""
        extra = 0.0
        if method.startswith("gui-rcpo"):
            net, extra = self.adapted(seed, setting)
        else:
            net = self.model(setting)
        return HeatmapSampler(net, greedy="argmax" if method == "argmax" else "digits",
                              answer=SETTING_ANSWER[setting]), extra

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        parts = []
        if method.endswith("rc"):
            parts.append(f"K={budget}, T={self.temperature(setting):g}, alpha={self.options['alpha']:g}")
        if method.startswith("gui-rcpo"):
            parts.append(self.rcpo_detail(setting))
        return "; ".join(parts) or self.greedy_detail(method)

    def rcpo_detail(self, setting: str) -> str:
        """How GUI-RCPO adapts ``setting``'s model, for the results table."""
        o = self.options
        return (f"RCPO {o['rcpo_epochs']} epochs x {o['rcpo_samples']} samples, lr={o['rcpo_lr']:g}, "
                f"beta={o['rcpo_beta']:g}")

    def greedy_detail(self, method: str) -> str:
        """How a single answer is decoded, for the results table."""
        return "most likely cell" if method == "argmax" else "digit-by-digit greedy"

    def describe(self) -> dict:
        return {**super().describe(), "models": self.model_configs, "temperature": {
            s: self.temperature(s) for s in self.settings}, "test_offset": TEST_OFFSET}


#: sampling temperature of the VLM settings: the published GUI-RC/GUI-RCPO value and one more
VLM_SETTING_TEMPERATURE = {"vlm-t0.5": 0.5, "vlm-t1": 1.0, "vlm-box-t0.5": 0.5, "vlm-box-t1": 1.0,
                           "vlm-snap-t0.5": 0.5, "vlm-box-snap-t0.5": 0.5}
#: how the VLM of each setting answers: a click "(x,y)" or the element's box "[x1,y1,x2,y2]" (thousandths)
VLM_SETTING_ANSWER = {"vlm-t0.5": "point", "vlm-t1": "point", "vlm-box-t0.5": "box", "vlm-box-t1": "box",
                      "vlm-snap-t0.5": "point", "vlm-box-snap-t0.5": "box"}
#: the settings whose answers are snapped to the elements the element-box network detects on the screenshot
VLM_SNAP_SETTINGS = ("vlm-snap-t0.5", "vlm-box-snap-t0.5")
#: the VLM of each answer format, full and quick
VLM_CONFIGS = {"point": VLM_CONFIG, "box": BOX_VLM_CONFIG}
QUICK_VLM_CONFIGS = {"point": QUICK_VLM_CONFIG, "box": QUICK_BOX_VLM_CONFIG}
#: the published reward's branch per answer format: clicks grown by point_expand_size (UI-TARS), boxes as they are
VLM_RCPO_BRANCH = {"point": "ui-tars", "box": "qwen"}


@TASKS.register("gui-grounding-vlm")
class GUIGroundingVLM(GUIGrounding):
    """GUI grounding with a transformers VLM that answers in text: greedy vs GUI-RC vs GUI-RCPO on its generate().

    The same procedural ScreenSpot files as ``gui-grounding``; the model is
    the LLaVA of :mod:`mmtts.modalities.gui.vlm`, trained on other rendered
    screens and cached, asked through :class:`TransformersSampler`. The
    ``vlm-*`` settings use the model that answers "(x,y)" in thousandths,
    the ``vlm-box-*`` settings the same model trained to answer with the
    target element's box "[x1,y1,x2,y2]" (boxes vote as themselves). The
    ``*-snap-*`` settings snap every answer to the element under its point,
    as detected on the screenshot by the task's :class:`ElementBoxNet` (the
    one the ``boxes`` settings of ``gui-grounding`` use): greedy answers the
    centre of its element, and GUI-RC votes with the detected element boxes
    (``region-vote`` with ``snap=True``). GUI-RCPO
    adapts it with the token backend of the ``gui-rcpo`` adapter, rewarding
    each answer as the published training code does (``published=True``:
    clicks in the UI-TARS branch, grown by ``point_expand_size`` pixels per
    side, 50 as the released scripts pass; boxes in the Qwen branch, as
    they are; in the snapping settings every answer is rewarded with the
    detected element under it, in the Qwen branch).

    Args:
        cache: where trained weights are kept; a default :class:`ModelCache` when None.
        quick: run a reduced version (a model trained in seconds, 8 screens per seed) for a fast check.
        **options: those of ``gui-grounding``, and ``rcpo_params`` ("full" fine-tuning or "lora" through peft)
            and ``point_expand_size`` (the RCPO reward's growth of a click, pixels per side).
    """

    description = ("GUI grounding with a transformers VLM answering in text: greedy vs GUI-RC region voting on its "
                   "generate() samples vs GUI-RCPO test-time RL on its token log-probs")
    methods = ("greedy", "gui-rc", "gui-rcpo", "gui-rcpo+rc")
    settings = tuple(VLM_SETTING_TEMPERATURE)
    option_defaults = {**GUIGrounding.option_defaults, "rcpo_samples": 8, "rcpo_epochs": 1, "rcpo_prompts": 8,
                       "rcpo_lr": 1e-4, "rcpo_beta": 0.04, "rcpo_params": "full", "point_expand_size": 50}

    def __init__(self, cache=None, quick: bool = False, **options):
        super().__init__(cache, quick, **options)
        if self.options["rcpo_params"] not in ("full", "lora"):
            raise MmttsError(f"rcpo_params={self.options['rcpo_params']!r}; choose 'full' or 'lora'")
        self.vlm_configs = QUICK_VLM_CONFIGS if quick else VLM_CONFIGS
        self._vlm: dict[str, tuple] = {}
        self._pixels = build_processor(self.vlm_configs["point"]).image_processor
        self._detected: dict[str, DetectedElements] = {}

    def prepare(self) -> list[str]:
        for answer in self.vlm_configs:
            self._load(answer)
        return [f"gui-vlm ({answer} answers)" for answer in self.vlm_configs]

    def model(self, setting: str = "vlm-t0.5"):
        """(model, processor): the VLM of ``setting`` (the click model or the box model), trained once and cached."""
        self.check_setting(setting)
        return self._load(VLM_SETTING_ANSWER[setting])

    def _load(self, answer: str):
        if answer not in self._vlm:
            cfg = self.vlm_configs[answer]
            state = self.cache.load_or_train("gui-vlm", cfg, lambda: train_vlm(cfg))
            self._vlm[answer] = build_vlm(cfg, state)
        return self._vlm[answer]

    def model_input(self, image: Image.Image) -> torch.Tensor:
        """A screenshot as the VLM takes it: its processor's pixel values (3, side, side)."""
        return self._pixels(images=image, return_tensors="pt")["pixel_values"][0]

    def temperature(self, setting: str) -> float:
        t = self.options["temperature"]
        return VLM_SETTING_TEMPERATURE[setting] if t is None else t

    def elements(self, setting: str, example: GroundingExample) -> DetectedElements | None:
        """The elements the element-box network detects on ``example``'s screenshot, in a snapping setting
        (one detection per screenshot, the last 64 kept); None otherwise."""
        if setting not in VLM_SNAP_SETTINGS:
            return None
        key = str(example.image)
        if key not in self._detected:
            if len(self._detected) >= 64:
                self._detected.pop(next(iter(self._detected)))
            with Image.open(example.image) as im:
                self._detected[key] = DetectedElements(self.box_model(), im.convert("RGB"), example.image_size)
        return self._detected[key]

    def adapted(self, seed: int, setting: str = "vlm-t0.5"):
        """((model, processor), seconds): the VLM after GUI-RCPO on the seed's unlabeled test prompts."""
        if (setting, seed) not in self._adapted:
            examples, pixels = self.data(seed)
            model, proc = self.model(setting)
            o = self.options
            t0 = time.perf_counter()
            answer, snap = VLM_SETTING_ANSWER[setting], setting in VLM_SNAP_SETTINGS
            adapter = GUIRCPO(copy.deepcopy(model), processor=proc, space="permille", prompt=PROMPT,
                              max_new_tokens=MAX_NEW_TOKENS[answer], n=o["rcpo_samples"],
                              temperature=self.temperature(setting), beta=o["rcpo_beta"], lr=o["rcpo_lr"], seed=seed,
                              trainable=o["rcpo_params"], published=True,
                              branch="qwen" if snap else VLM_RCPO_BRANCH[answer],
                              point_expand_size=o["point_expand_size"])
            g = torch.Generator().manual_seed(derive_seed(seed, 0x12C0))
            n, p = len(examples), o["rcpo_prompts"]
            with one_thread():
                for _ in range(o["rcpo_epochs"]):
                    order = torch.randperm(n, generator=g).tolist()
                    for start in range(0, n, p):
                        idx = order[start:start + p]
                        adapter({"images": [pixels[i] for i in idx],
                                 "instructions": [examples[i].instruction for i in idx],
                                 "sizes": [examples[i].image_size for i in idx], "ids": idx,
                                 "elements": [self.elements(setting, examples[i]) for i in idx] if snap else None})
            seconds = time.perf_counter() - t0
            self._adapted[setting, seed] = ((adapter.release().eval(), proc), seconds, seconds / adapter.updates)
        return self._adapted[setting, seed][:2]

    def sampler(self, method: str, setting: str, seed: int) -> tuple[TransformersSampler, float]:
        extra = 0.0
        if method.startswith("gui-rcpo"):
            (model, proc), extra = self.adapted(seed, setting)
        else:
            model, proc = self.model(setting)
        return TransformersSampler(model, proc, space="permille", prompt=PROMPT,
                                   max_new_tokens=MAX_NEW_TOKENS[VLM_SETTING_ANSWER[setting]], share_prompt=True), extra

    def run(self, method: str, setting: str, budget: int | None, seed: int) -> dict[str, float]:
        out = super().run(method, setting, budget, seed)
        step = self._adapted[setting, seed][2] if method.startswith("gui-rcpo") else float("nan")
        out["rcpo_ms_per_step"] = 1000.0 * step
        return out

    def detail(self, method: str, setting: str, budget: int | None) -> str:
        text = super().detail(method, setting, budget)
        return text + ("; snapped to detected elements" if setting in VLM_SNAP_SETTINGS else "")

    def rcpo_detail(self, setting: str) -> str:
        o = self.options
        box = VLM_SETTING_ANSWER[setting] == "box"
        reward = "published reward, boxes as they are" if box else f"published reward +{o['point_expand_size']} px"
        if setting in VLM_SNAP_SETTINGS:
            reward = "published reward (Qwen branch) on the detected elements"
        return (f"RCPO {o['rcpo_epochs']} epoch x {o['rcpo_samples']} samples, {o['rcpo_prompts']} prompts/step, "
                f"lr={o['rcpo_lr']:g}, beta={o['rcpo_beta']:g}, {o['rcpo_params']}, {reward}")

    def greedy_detail(self, method: str) -> str:
        return "greedy decoding (do_sample=False)"

    def describe(self) -> dict:
        return {**Task.describe(self), "model": self.vlm_configs["point"], "box_model": self.vlm_configs["box"],
                "temperature": {s: self.temperature(s) for s in self.settings}, "test_offset": TEST_OFFSET}
