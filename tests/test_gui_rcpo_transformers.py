"""GUI-RCPO on a transformers policy: token log-probabilities, the GRPO step, grouping, exact reset, bad input."""

import copy

import numpy as np
import pytest
import torch

from mmtts.adapters.gui_rcpo import GUIRCPO, grouped_region_rewards, published_region_rewards
from mmtts.core.errors import MmttsError
from mmtts.modalities.gui.parse import parse_answers
from mmtts.modalities.gui.render import render_screen
from mmtts.modalities.gui.transformers_sampler import generate_answers, sequence_logprobs
from mmtts.modalities.gui.vlm import (MAX_NEW_TOKENS, QUICK_BOX_VLM_CONFIG, QUICK_VLM_CONFIG, build_vlm, prompt_text,
                                      vocabulary)
from mmtts.modalities.gui.vlm_train import train_vlm
from mmtts.strategies.region_vote import point_boxes, region_rewards
from mmtts.tasks.cache import ModelCache

SCREENS = [render_screen(s, (1280, 720)) for s in (3, 4)]
PROMPT = "<image>{instruction}:"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    return cache.load_or_train("gui-vlm", QUICK_VLM_CONFIG, lambda: train_vlm(QUICK_VLM_CONFIG))


def batch(ids=(0, 1)):
    return {"images": [SCREENS[i % 2].image for i in range(len(ids))],
            "instructions": ["click the first item of the side menu", "close the window", "click the last button at "
                             "the bottom"][:len(ids)], "sizes": [SCREENS[i % 2].size for i in range(len(ids))],
            "ids": list(ids)}


def rcpo(model, proc, **kw):
    kw = {"n": 4, "temperature": 1.0, "trainable": "full", "lr": 1e-3, "max_new_tokens": 10, **kw}
    return GUIRCPO(model, processor=proc, prompt=PROMPT, **kw)


def test_logprobs_equal_a_direct_forward_of_each_sequence():
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    g = generate_answers(model, proc, SCREENS[0].image, prompt_text("close the window"), [1, 2, 3], 0.7,
                         max_new_tokens=6)
    with torch.no_grad():
        logp = sequence_logprobs(model, g.inputs, g.tokens, 0.7)
        for row in range(3):
            n = int(g.mask[row].sum())
            ids = torch.cat([g.inputs["input_ids"][0], g.tokens[row, :n]])[None]
            logits = model(input_ids=ids, pixel_values=g.inputs["pixel_values"]).logits[0]
            prompt = g.inputs["input_ids"].shape[1]
            ref = torch.log_softmax(logits[prompt - 1:-1] / 0.7, -1).gather(1, ids[0, prompt:, None])[:, 0]
            assert torch.allclose(logp[row, :n], ref, atol=1e-5)
    # the tokens generate() drew are the ones scored, and every answer ends with its end token or the length limit
    eos = vocabulary()["</s>"]
    for row in range(3):
        t = g.tokens[row][g.mask[row]]
        assert (t[-1] == eos) or len(t) == 6
        assert (t[:-1] != eos).all()


def test_a_labelled_reward_raises_the_target_answers_probability(trained):
    model, proc = build_vlm(QUICK_VLM_CONFIG, trained)
    screen, instruction = SCREENS[0], "close the window"

    def xs(m):  # 64 answers drawn with fixed seeds: their x in pixels (NaN when unparsed)
        t = generate_answers(m, proc, screen.image, prompt_text(instruction), list(range(1000, 1064)), 1.0,
                             max_new_tokens=10).texts
        return parse_answers(t, "permille", screen.size).points[:, 0]

    cut = np.nanmedian(xs(model))                   # the target: answers right of the model's median click

    def labelled(points, groups, sizes, alpha, **_):
        return (np.nan_to_num(points[:, 0], nan=-1.0) > cut).astype(float)

    before = float((np.nan_to_num(xs(model), nan=-1.0) > cut).mean())
    adapter = rcpo(model, proc, n=16, reward=labelled, lr=3e-3, beta=0.0)
    b = {"images": [screen.image], "instructions": [instruction], "sizes": [screen.size], "ids": [0]}
    for _ in range(4):
        adapter(b)
    after = float((np.nan_to_num(xs(adapter.model), nan=-1.0) > cut).mean())
    assert after >= before + 0.2


def test_groups_are_prompt_ids_and_never_mix(trained):
    model, proc = build_vlm(QUICK_VLM_CONFIG, trained)
    seen = {}

    def spy(points, groups, sizes, alpha, **kw):
        seen.update(points=points.copy(), groups=groups.copy(), sizes=dict(sizes))
        return grouped_region_rewards(points, groups, sizes, alpha, **kw)

    adapter = rcpo(model, proc, reward=spy, alpha=40.0)
    adapter(batch(ids=(7, 3, 7)))
    assert seen["groups"].tolist() == [7] * 4 + [3] * 4 + [7] * 4
    # each group's rewards are its own vote: the same as rewarding the group on its own
    rewards = grouped_region_rewards(seen["points"], seen["groups"], seen["sizes"], 40.0)
    for g in (3, 7):
        m = seen["groups"] == g
        alone = region_rewards(point_boxes(seen["points"][m], 40.0), *seen["sizes"][g])
        assert np.array_equal(rewards[m], alone)
    assert adapter.last["parsed"] > 0.5


def test_answers_are_rewarded_with_the_element_under_them(trained):
    from mmtts.modalities.gui.elements import ElementList

    model, proc = build_vlm(QUICK_VLM_CONFIG, trained)
    seen = []

    def spy(points, groups, sizes, alpha, **kw):
        seen.append({"points": points.copy(), **kw})
        return grouped_region_rewards(points, groups, sizes, alpha, **kw)

    # the whole first screen is one element; the second prompt has no elements (its answers vote as they are)
    left = ElementList([[0, 0, 1280, 720]])
    adapter = rcpo(model, proc, reward=spy)
    adapter({**batch(ids=(0, 1)), "elements": [left, None]})
    points, boxes = seen[0]["points"], seen[0]["boxes"]
    first, second = slice(0, 4), slice(4, 8)
    parsed = np.isfinite(points[first]).all(1)
    assert parsed.any()
    assert np.array_equal(boxes[first][parsed], np.tile([0.0, 0.0, 1280.0, 720.0], (int(parsed.sum()), 1)))
    assert np.isnan(boxes[first][~parsed]).all() and np.isnan(boxes[second]).all()  # click answers, unsnapped
    with pytest.raises(MmttsError, match="1 entries for 2 prompts"):
        adapter({**batch(ids=(0, 1)), "elements": [left]})
    with pytest.raises(MmttsError, match="holds a list"):
        adapter({**batch(ids=(0, 1)), "elements": [[0, 0, 1, 1], None]})


def test_box_answers_reach_the_published_qwen_reward_as_boxes(tmp_path):
    state = ModelCache(tmp_path).load_or_train("gui-vlm", QUICK_BOX_VLM_CONFIG,
                                               lambda: train_vlm(QUICK_BOX_VLM_CONFIG))
    model, proc = build_vlm(QUICK_BOX_VLM_CONFIG, state)
    seen = {}

    def spy(points, groups, sizes, alpha, **kw):
        seen.update(points=points.copy(), groups=groups.copy(), sizes=dict(sizes), **kw)
        return published_region_rewards(points, groups, sizes, alpha, branch="qwen", **kw)

    adapter = rcpo(model, proc, n=8, temperature=0.5, reward=spy, max_new_tokens=MAX_NEW_TOKENS["box"])
    adapter(batch(ids=(0, 1)))
    boxes, points = seen["boxes"], seen["points"]
    answered = np.isfinite(boxes).all(1)
    assert answered.mean() >= 0.5                          # the box model answers with boxes, passed as boxes
    assert np.allclose(points[answered], (boxes[answered, :2] + boxes[answered, 2:]) / 2)
    r = published_region_rewards(points, seen["groups"], seen["sizes"], boxes=boxes, branch="qwen")
    assert r[answered].max() > 0 and (r[~answered] == 0).all()   # a box votes as itself; no answer earns 0
    assert adapter.last["reward"] == pytest.approx(r.mean())


def test_reset_is_exact_with_full_fine_tuning():
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    start = copy.deepcopy(model.state_dict())
    adapter = rcpo(model, proc, lr=1e-2, beta=0.1)
    b = batch()
    first = adapter(b)
    assert any(not torch.equal(start[k], v) for k, v in adapter.model.state_dict().items())
    adapter.reset()
    assert all(torch.equal(start[k], v) for k, v in adapter.model.state_dict().items())
    again = adapter(b)                              # the same seeds after reset: the same step
    assert torch.equal(torch.nan_to_num(first, -1.0), torch.nan_to_num(again, -1.0))


def test_reset_is_exact_with_lora():
    pytest.importorskip("peft")
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = rcpo(model, proc, trainable="lora", lr=1e-2, lora={"r": 2, "lora_alpha": 4})
    names = [n for n, _ in adapter.params]
    assert names and all("lora_" in n for n in names)
    assert set(adapter._snapshot["params"]) == set(names)          # only the adapters are snapshotted
    start = {n: p.detach().clone() for n, p in adapter.params}
    adapter(batch())
    assert any(not torch.equal(start[n], p) for n, p in adapter.params)
    adapter.reset()
    assert all(torch.equal(start[n], p) for n, p in adapter.params)
    with adapter.model.disable_adapter():                          # the base weights never moved
        sd = adapter.model.get_base_model().state_dict()
        assert all(torch.equal(base[k], sd[k]) for k in base if k in sd)


def test_labels_are_never_read(trained):
    model, proc = build_vlm(QUICK_VLM_CONFIG, trained)
    a = rcpo(model, proc)
    b = batch()
    a(b)
    model2, _ = build_vlm(QUICK_VLM_CONFIG, trained)
    c = rcpo(model2, proc)
    c({**b, "boxes": [(0, 0, 1, 1)] * 2, "labels": [9, 9]})
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.params, c.params))


def test_an_empty_generation_is_a_missing_vote_and_the_step_still_runs():
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    eos = vocabulary()["</s>"]
    model.generation_config.suppress_tokens = [i for i in range(len(vocabulary())) if i != eos]
    g = generate_answers(model, proc, SCREENS[0].image, prompt_text("close the window"), [1, 2], 1.0)
    assert g.texts == ["", ""] and g.mask.sum(1).tolist() == [1, 1]
    adapter = rcpo(model, proc, beta=0.1)
    votes = adapter(batch())
    assert torch.isnan(votes).all() and adapter.last["reward"] == 0.0 and adapter.last["parsed"] == 0.0


def test_bad_input():
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    with pytest.raises(MmttsError, match="n >= 2"):
        rcpo(model, proc, n=0)
    with pytest.raises(MmttsError, match="pass its processor="):
        GUIRCPO(model, trainable="full")
    with pytest.raises(MmttsError, match="trainable='bits'"):
        rcpo(model, proc, trainable="bits")
    a = rcpo(model, proc)
    with pytest.raises(MmttsError, match=r"lacks \['instructions'\]"):
        a({"images": [SCREENS[0].image], "sizes": [(10, 10)], "ids": [0]})
    with pytest.raises(MmttsError, match="do not fit the vision tower"):
        a({**batch(ids=(0,)), "images": [torch.zeros(3, 20, 20)]})
    with pytest.raises(MmttsError, match=r"batch\['sizes'\] must be \(B, 2\) positive"):
        a({**batch(ids=(0,)), "sizes": [(0, 720)]})
    bare = copy.deepcopy(model)
    bare.generation_config = None
    with pytest.raises(MmttsError, match="no generation config"):
        rcpo(bare, proc)
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(MmttsError, match="needs the peft package.*trainable='full'"):
            rcpo(model, proc, trainable="lora")
