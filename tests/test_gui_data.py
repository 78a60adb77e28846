"""Coordinate spaces, answer parsing, the ScreenSpot / ScreenSpot-Pro / GUI-RCPO loaders and the metric."""

import json

import numpy as np
import pytest
from PIL import Image

from mmtts.core.errors import MmttsError
from mmtts.modalities.gui import (CoordSpace, GroundingExample, grounding_accuracy, load_rcpo_jsonl, load_screenspot,
                                  load_screenspot_pro, parse_answer, parse_answers, point_in_box, write_screenspot)


@pytest.mark.parametrize("spec", ["pixel", "unit", "permille", "resized:1288x728", "resized:77x1001"])
def test_coordinate_spaces_round_trip(spec):
    space = CoordSpace.parse(spec)
    assert CoordSpace.parse(str(space)) == space
    rng = np.random.default_rng(0)
    size = (1920, 1080)
    for shape in ((5, 2), (5, 4), (2,)):
        px = rng.uniform(0, 1, shape) * np.resize([1920, 1080], shape[-1])
        np.testing.assert_allclose(space.to_pixels(space.from_pixels(px, size), size), px, rtol=1e-12)


def test_coordinate_spaces_mean_what_they_say():
    size = (2000, 1000)
    assert CoordSpace("unit").to_pixels([0.5, 0.25], size).tolist() == [1000, 250]
    assert CoordSpace("permille").to_pixels([500, 250, 1000, 1000], size).tolist() == [1000, 250, 2000, 1000]
    assert CoordSpace.parse("resized:1000x500").to_pixels([100, 100], size).tolist() == [200, 200]
    assert CoordSpace("pixel").to_pixels([3, 4], size).tolist() == [3, 4]


def test_coordinate_space_errors_say_the_fix():
    with pytest.raises(MmttsError, match="resized:WxH"):
        CoordSpace.parse("resized")
    with pytest.raises(MmttsError, match="choose one of"):
        CoordSpace.parse("normalised")
    with pytest.raises(MmttsError, match="end in 2"):
        CoordSpace("unit").to_pixels([1, 2, 3], (10, 10))


@pytest.mark.parametrize("text,expected", [
    ("(12, 34)", ("point", (12.0, 34.0))),
    ("The element is at [0.25, 0.75].", ("point", (0.25, 0.75))),
    ("click(x=100, y=200)", ("point", (100.0, 200.0))),
    ('{"x": 3.5, "y": 4}', ("point", (3.5, 4.0))),
    ("<box>(10,20),(30,40)</box>", ("box", (10.0, 20.0, 30.0, 40.0))),
    ("[30, 40, 10, 20]", ("box", (10.0, 20.0, 30.0, 40.0))),
    ("112 334", ("point", (112.0, 334.0))),
])
def test_parse_answer_forms(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("garbage", ["", "I cannot find it", "7", "1 2 3", "(nan, 3)", "(inf, inf)", None, 42,
                                     ["(1, 2)"], "x= y="])
def test_garbage_answers_are_missing_votes(garbage):
    assert parse_answer(garbage) is None
    p = parse_answers([garbage, "(5, 6)"], "pixel", (100, 100))
    assert p.ok.tolist() == [False, True] and p.parse_rate == 0.5
    assert np.isnan(p.points[0]).all() and p.points[1].tolist() == [5, 6]


def test_parse_answers_converts_to_original_pixels():
    p = parse_answers(["(500, 500)", "[0, 0, 100, 200]"], "permille", (1920, 1080))
    np.testing.assert_allclose(p.points, [[960, 540], [96, 108]])
    assert np.isnan(p.boxes[0]).all()
    np.testing.assert_allclose(p.boxes[1], [0, 0, 192, 216])


def _png(path, size):
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_screenspot_loader_reads_xywh(tmp_path):
    _png(tmp_path / "a.png", (200, 100))
    (tmp_path / "ann.json").write_text(json.dumps([
        {"img_filename": "a.png", "bbox": [10, 20, 30, 40], "instruction": "open", "data_type": "icon",
         "data_source": "ios"}]))
    (ex,) = load_screenspot(tmp_path / "ann.json", tmp_path)
    assert ex.box == (10, 20, 40, 60) and ex.image_size == (200, 100)
    assert ex.element_type == "icon" and ex.platform == "ios" and ex.instruction == "open"
    assert ex.load_image().size == (200, 100)


def test_screenspot_pro_loader_reads_corners(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([
        {"img_filename": "b.png", "bbox": [10, 20, 30, 40], "instruction": "save", "ui_type": "text",
         "img_size": [3840, 2160], "platform": "windows", "application": "word"}]))
    (ex,) = load_screenspot_pro(tmp_path / "ann.json", tmp_path)
    assert ex.box == (10, 20, 30, 40) and ex.image_size == (3840, 2160)
    assert ex.element_type == "text" and ex.platform == "windows" and ex.meta["application"] == "word"


def test_rcpo_jsonl_loader_reads_fractions(tmp_path):
    _png(tmp_path / "c.png", (400, 200))
    lines = [{"image": "c.png", "instruction": "close", "bbox": [0.1, 0.2, 0.3, 0.4]},
             {"image": "c.png", "problem": "unlabeled prompt"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    a, b = load_rcpo_jsonl(tmp_path / "d.jsonl")
    np.testing.assert_allclose(a.box, (40, 40, 120, 80))
    assert b.box is None and b.instruction == "unlabeled prompt"


def test_screenspot_writer_round_trips(tmp_path):
    _png(tmp_path / "e.png", (300, 300))
    exs = [GroundingExample(tmp_path / "e.png", "a", (300, 300), (1, 2, 50, 60), "text", "web", "0"),
           GroundingExample(tmp_path / "e.png", "b", (300, 300), (100, 120, 130, 200), "icon", "web", "1")]
    back = load_screenspot(write_screenspot(exs, tmp_path / "s.json"), tmp_path)
    assert [(e.box, e.instruction, e.element_type, e.id) for e in back] == \
           [(e.box, e.instruction, e.element_type, e.id) for e in exs]


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(MmttsError, match="does not exist"):
        load_screenspot(tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps([{"img_filename": "x.png", "instruction": "i"}]))
    with pytest.raises(MmttsError, match="no 'img_size' field"):
        load_screenspot_pro(tmp_path / "bad.json", tmp_path)
    _png(tmp_path / "z.png", (10, 10))
    (tmp_path / "zero.json").write_text(json.dumps([{"img_filename": "z.png", "instruction": "i",
                                                     "bbox": [5, 5, 0, 3]}]))
    with pytest.raises(MmttsError, match="no area"):
        load_screenspot(tmp_path / "zero.json", tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "z.png", "instruction": "i", "bbox": [10, 10, 50, 50]}))
    with pytest.raises(MmttsError, match="fractions"):
        load_rcpo_jsonl(tmp_path / "p.jsonl")
    (tmp_path / "q.json").write_text(json.dumps([{"img_filename": "nope.png", "instruction": "i",
                                                  "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(MmttsError, match="image_dir"):
        load_screenspot(tmp_path / "q.json", tmp_path)


def test_point_in_box_and_split_accuracy():
    boxes = [(0, 0, 10, 10), (0, 0, 10, 10), (5, 5, 6, 6), (0, 0, 1, 1)]
    points = [[10, 10], [10.01, 5], [5.5, 5.5], [np.nan, np.nan]]
    assert point_in_box(points, boxes).tolist() == [True, False, True, False]
    exs = [GroundingExample("x", "i", (10, 10), b, t, p) for b, t, p in
           zip(boxes, ["text", "text", "icon", "icon"], ["web", "ios", "web", "web"])]
    acc = grounding_accuracy(exs, points)
    assert acc["accuracy"] == 0.5 and acc["type/text"] == 0.5 and acc["type/icon"] == 0.5
    assert acc["platform/ios"] == 0.0 and acc["platform/web"] == pytest.approx(2 / 3)
    with pytest.raises(MmttsError, match="one prediction per example"):
        point_in_box(points[:2], boxes)
