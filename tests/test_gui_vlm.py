"""The text-answering VLM (a LLaVA built from configs): its tokenizer and processor, training, and sampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmtts.core.errors import MmttsError
from mmtts.core.registry import STRATEGIES
from mmtts.core.strategy import run_strategy
from mmtts.modalities.gui import ClickProcess, TransformersSampler
from mmtts.modalities.gui.parse import parse_answers
from mmtts.modalities.gui.render import instructions, render_screen
from mmtts.modalities.gui.transformers_sampler import answer_mask, generate_answers, nucleus
from mmtts.modalities.gui.vlm import (MAX_NEW_TOKENS, QUICK_BOX_VLM_CONFIG, QUICK_VLM_CONFIG, VLM_CONFIG,
                                      answer_format, build_vlm, image_tokens, prompt_text, vocabulary)
from mmtts.modalities.gui.vlm_train import IGNORE, answer_ids, box_ids, screen_examples, train_vlm, training_batch
from mmtts.tasks.cache import ModelCache

SCREEN = render_screen(7, (1280, 720))
INSTRUCTION = "click the third item of the side menu"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quick VLM, trained once (seconds) into a private cache."""
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    state = cache.load_or_train("gui-vlm", QUICK_VLM_CONFIG, lambda: train_vlm(QUICK_VLM_CONFIG))
    return build_vlm(QUICK_VLM_CONFIG, state)


@pytest.fixture(scope="module")
def trained_box(tmp_path_factory):
    """The quick VLM that answers with boxes, trained once (seconds) into a private cache."""
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    state = cache.load_or_train("gui-vlm", QUICK_BOX_VLM_CONFIG, lambda: train_vlm(QUICK_BOX_VLM_CONFIG))
    return build_vlm(QUICK_BOX_VLM_CONFIG, state)


def test_processor_and_training_prompts_agree():
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    text = prompt_text("click 'Open' in the file list")
    ids = proc(images=SCREEN.image, text=text, return_tensors="pt")["input_ids"][0].tolist()
    n = image_tokens(QUICK_VLM_CONFIG)
    assert ids == proc.tokenizer(text.replace("<image>", "<image>" * n))["input_ids"]
    assert ids[:n] == [vocabulary()["<image>"]] * n and "<unk>" not in proc.tokenizer.convert_ids_to_tokens(ids)
    # every word the renderer's instructions use is in the vocabulary
    rng = np.random.default_rng(0)
    for s in range(20):
        for _, _, t in instructions(render_screen(s), 8, rng):
            assert "<unk>" not in proc.tokenizer.tokenize(prompt_text(t)), t
    # answers: one token per character, decoded back to the text
    vocab = vocabulary()
    a = answer_ids(523, 7, vocab)
    assert proc.tokenizer.decode(a, skip_special_tokens=True) == "(523,7)" and a[-1] == vocab["</s>"]


def test_training_batch_labels_only_the_answer():
    _, proc = build_vlm(QUICK_VLM_CONFIG)
    cfg = {**QUICK_VLM_CONFIG, "screens": 2, "per_screen": 2}
    data = screen_examples(cfg, proc)
    b = training_batch(data, np.array([0, 3]), np.random.default_rng(0), vocabulary())
    for row in range(2):
        n_prompt = len(data["prompts"][[0, 3][row]])
        lab, ids = b["labels"][row], b["input_ids"][row]
        assert (lab[:n_prompt] == IGNORE).all()
        answer = lab[n_prompt:][lab[n_prompt:] != IGNORE]
        text = proc.tokenizer.decode(answer, skip_special_tokens=True)
        x, y = (int(v) for v in text.strip("()").split(","))
        x1, y1, x2, y2 = data["boxes"][[0, 3][row]]
        assert x1 - 1 <= x <= x2 and y1 - 1 <= y <= y2          # a click inside the target, in thousandths
        assert (ids[b["attention_mask"][row] == 0] == vocabulary()["<pad>"]).all()
    assert b["pixel_values"].shape == (2, 3, 32, 32)


def test_same_config_same_weights():
    cfg = {**QUICK_VLM_CONFIG, "screens": 2, "steps": 3}
    a, b = train_vlm(cfg), train_vlm(cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_parses_generations_in_every_space(trained):
    model, proc = trained
    k = 12
    seeds = list(range(100, 100 + k))
    texts = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}:",
                                max_new_tokens=12).sample(SCREEN.image, INSTRUCTION, seeds, 1.0)
    assert parse_answers(texts, "permille", SCREEN.size).ok.mean() >= 0.75  # the quick model writes "(x,y)"
    for space in ("permille", "pixel", "unit", "resized:640x360"):
        s = TransformersSampler(model, proc, space=space, prompt="<image>{instruction}:", max_new_tokens=12)
        res = run_strategy(STRATEGIES.create("region-vote", n=k), ClickProcess(s, SCREEN.image, INSTRUCTION,
                                                                               SCREEN.size, 1.0),
                           None, budget=k, seed=0)
        got = res.population["texts"]
        p = parse_answers(got, space, SCREEN.size)
        assert np.allclose(res.population["points"].numpy(), p.points, equal_nan=True)
        assert res.extra["voted"] + res.extra["missing"] == k
    # the same text in two spaces: pixels scale by the stated unit
    a = parse_answers(["(500,250)"], "permille", SCREEN.size).points[0]
    b = parse_answers(["(500,250)"], "resized:640x360", SCREEN.size).points[0]
    assert np.allclose(a, [640, 180]) and np.allclose(b, [1000, 500])


def test_unparseable_generations_are_missing_votes():
    model, proc = build_vlm(QUICK_VLM_CONFIG)                  # random weights: mostly not a click
    s = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}:", max_new_tokens=8)
    k = 10
    res = run_strategy(STRATEGIES.create("region-vote", n=k), ClickProcess(s, SCREEN.image, INSTRUCTION,
                                                                           SCREEN.size, 1.0), None, budget=k, seed=0)
    parsed = parse_answers(res.population["texts"], "permille", SCREEN.size).ok
    assert res.extra["missing"] >= k - parsed.sum() and res.extra["missing"] > 0


def test_greedy_is_generate_without_sampling_and_top_p_narrows_to_it(trained):
    model, proc = trained
    s = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}:", max_new_tokens=12)
    greedy = s.sample(SCREEN.image, INSTRUCTION, [0, 1, 2], 0.0)
    x = proc(images=SCREEN.image, text=prompt_text(INSTRUCTION), return_tensors="pt")
    direct = model.generate(**x, do_sample=False, max_new_tokens=12)
    assert greedy == proc.batch_decode(direct[:, x["input_ids"].shape[1]:], skip_special_tokens=True) * 3
    narrow = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}:", max_new_tokens=12,
                                 top_p=1e-6)
    assert narrow.sample(SCREEN.image, INSTRUCTION, [5, 6, 7, 8], 2.0) == greedy[:1] * 4
    wide = s.sample(SCREEN.image, INSTRUCTION, list(range(16)), 2.0)
    assert len(set(wide)) > 1
    with pytest.raises(MmttsError, match="top_p"):
        TransformersSampler(model, proc, top_p=0.0)


def test_a_shared_prompt_cache_gives_the_same_answers(trained):
    model, proc = trained
    args = (model, proc, SCREEN.image, prompt_text(INSTRUCTION), list(range(24)), 1.0)
    a = generate_answers(*args, max_new_tokens=12)
    b = generate_answers(*args, max_new_tokens=12, share_prompt=True)
    assert a.texts == b.texts and torch.equal(a.tokens, b.tokens)


def test_nucleus_keeps_the_smallest_set_over_top_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = torch.isfinite(nucleus(scores, 0.8))
    assert kept.tolist() == [[True, True, False, False], [False, True, True, True]]
    assert torch.equal(nucleus(scores, 1.0), scores)


def test_answer_mask_ends_at_the_first_end_token():
    t = torch.tensor([[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 5, 5, 5, 5]])
    assert answer_mask(t, 2).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_save_and_load_round_trip(trained, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, proc = trained
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model2 = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    proc2 = LlavaProcessor.from_pretrained(tmp_path)
    a = TransformersSampler(model, proc, "permille", "<image>{instruction}:", max_new_tokens=12)
    b = TransformersSampler(model2, proc2, "permille", "<image>{instruction}:", max_new_tokens=12)
    seeds = [11, 12, 13, 14]
    assert a.sample(SCREEN.image, INSTRUCTION, seeds, 1.0) == b.sample(SCREEN.image, INSTRUCTION, seeds, 1.0)


def test_sampler_bad_input():
    model, proc = build_vlm(QUICK_VLM_CONFIG)
    s = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}:", max_new_tokens=4)
    with pytest.raises(MmttsError, match="asked for 0 answers"):
        s.sample(SCREEN.image, INSTRUCTION, [], 1.0)
    with pytest.raises(MmttsError, match=r"do not fit the vision tower, which takes \(3, 32, 32\)"):
        generate_answers(model, proc, torch.zeros(3, 40, 40), prompt_text(INSTRUCTION), [1], 1.0)
    with pytest.raises(MmttsError, match="non-empty image"):
        s.sample(Image.new("RGB", (0, 10)), INSTRUCTION, [1], 1.0)
    # pixel values of the right size are used as they are
    pixels = proc(images=SCREEN.image, text=prompt_text(INSTRUCTION), return_tensors="pt")["pixel_values"][0]
    g = generate_answers(model, proc, pixels, prompt_text(INSTRUCTION), [1, 2], 1.0, max_new_tokens=4)
    assert g.texts == s.sample(SCREEN.image, INSTRUCTION, [1, 2], 1.0)
    model.generation_config = None
    with pytest.raises(MmttsError, match="no generation config with an eos_token_id"):
        s.sample(SCREEN.image, INSTRUCTION, [1], 1.0)


def test_box_answers_name_the_target_box():
    vocab = vocabulary()
    _, proc = build_vlm(QUICK_BOX_VLM_CONFIG)
    a = box_ids((12.4, 7.0, 250.2, 999.5), vocab)             # edges rounded outward, one token per character
    assert proc.tokenizer.decode(a, skip_special_tokens=True) == "[12,7,251,1000]" and a[-1] == vocab["</s>"]
    assert len(a) <= MAX_NEW_TOKENS["box"] and len(box_ids((999, 999, 1000, 1000), vocab)) <= MAX_NEW_TOKENS["box"]
    cfg = {**QUICK_BOX_VLM_CONFIG, "screens": 2, "per_screen": 2}
    data = screen_examples(cfg, proc)
    # the same text every time the example is drawn, whatever the random stream
    b1 = training_batch(data, np.array([1, 2]), np.random.default_rng(0), vocab, "box")
    b2 = training_batch(data, np.array([1, 2]), np.random.default_rng(9), vocab, "box")
    assert torch.equal(b1["labels"], b2["labels"])
    for row, i in enumerate([1, 2]):
        lab = b1["labels"][row]
        text = proc.tokenizer.decode(lab[lab != IGNORE], skip_special_tokens=True)
        got = parse_answers([text], "permille", (1000, 1000)).boxes[0]
        x1, y1, x2, y2 = data["boxes"][i]
        assert np.allclose(got, [np.floor(x1), np.floor(y1), np.ceil(x2), np.ceil(y2)])
    # the point model's config has no answer key: its hash and cached weights stay as they were
    assert "answer" not in VLM_CONFIG and answer_format(VLM_CONFIG) == "point"
    assert answer_format(QUICK_BOX_VLM_CONFIG) == "box"
    with pytest.raises(MmttsError, match="answer must be one of"):
        build_vlm({**QUICK_VLM_CONFIG, "answer": "polygon"})


def test_box_model_answers_parseable_boxes(trained_box):
    model, proc = trained_box
    assert model.generation_config.max_new_tokens == MAX_NEW_TOKENS["box"]
    s = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}:",
                            max_new_tokens=MAX_NEW_TOKENS["box"])
    texts = s.sample(SCREEN.image, INSTRUCTION, list(range(16)), 1.0) + s.sample(SCREEN.image, INSTRUCTION, [0], 0.0)
    p = parse_answers(texts, "permille", SCREEN.size)
    assert p.ok.mean() >= 0.75 and p.ok[-1]                    # the quick model writes "[x1,y1,x2,y2]"
    boxes = p.boxes[p.ok]
    assert np.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert np.allclose(p.points[p.ok], (boxes[:, :2] + boxes[:, 2:]) / 2)   # a box answer is scored by its centre
    # in the box space the text's thousandths become pixels of the screenshot
    one = texts[-1]
    x1, y1, x2, y2 = (int(v) for v in one.strip("[]").split(","))
    w, h = SCREEN.size
    assert np.allclose(p.boxes[-1], [x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000])
    # the region vote counts each parsed box as itself
    k = 16
    res = run_strategy(STRATEGIES.create("region-vote", n=k), ClickProcess(s, SCREEN.image, INSTRUCTION,
                                                                           SCREEN.size, 1.0), None, budget=k, seed=0)
    got = parse_answers(res.population["texts"], "permille", SCREEN.size)
    assert np.allclose(res.population["boxes"].numpy(), got.boxes, equal_nan=True)
    assert 0 < res.extra["voted"] <= got.ok.sum() and res.extra["voted"] + res.extra["missing"] == k
