"""Click samplers (the project's model, a tiny random transformers VLM) and region voting as a strategy."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmtts.core.errors import BudgetError, MmttsError, ProcessError
from mmtts.core.registry import STRATEGIES
from mmtts.core.strategy import run_strategy
from mmtts.modalities.gui import ClickProcess, ClickSampler, GroundingNet, HeatmapSampler, TransformersSampler
from mmtts.core.rng import Streams
from mmtts.modalities.gui.model import BoxGrounding, ElementBoxNet, boxes_at, cells_at
from mmtts.modalities.gui.parse import parse_answer, parse_answers
from mmtts.strategies.region_vote import RegionConsistency, consensus, vote_boxes


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def heatmap():
    torch.manual_seed(0)
    return HeatmapSampler(GroundingNet(width=8))


IMAGE = Image.new("RGB", (640, 360), (120, 130, 140))


def test_heatmap_sampler_is_seeded_and_greedy_at_zero(heatmap):
    assert isinstance(heatmap, ClickSampler)
    a = heatmap.sample(IMAGE, "close the window", range(5, 21), 1.0)
    assert a == heatmap.sample(IMAGE, "close the window", range(5, 21), 1.0)
    assert a != heatmap.sample(IMAGE, "close the window", range(6, 22), 1.0)
    g = heatmap.sample(IMAGE, "close the window", [1, 2, 3], 0.0)
    assert len(set(g)) == 1 and g == heatmap.sample(IMAGE, "close the window", [4, 5, 6], 0.0)
    p = parse_answers(a, heatmap.space, (1920, 1080))
    assert str(heatmap.space) == "permille"
    assert p.ok.all() and (p.points >= 0).all() and (p.points <= [1920, 1080]).all()
    # greedy decoding is digit by digit; "argmax" is the most likely cell, and both are deterministic
    top = HeatmapSampler(heatmap.model, greedy="argmax").sample(IMAGE, "close the window", [0, 1], 0.0)
    assert len(set(top)) == 1 and parse_answer(top[0])[0] == "point"
    with pytest.raises(MmttsError, match="greedy="):
        HeatmapSampler(heatmap.model, greedy="beam")
    with pytest.raises(MmttsError, match="0 answers"):
        heatmap.sample(IMAGE, "x", [], 1.0)
    with pytest.raises(MmttsError, match="one integer seed per answer"):
        heatmap.sample(IMAGE, "x", 16, 1.0)
    with pytest.raises(MmttsError, match="temperature"):
        heatmap.sample(IMAGE, "x", [0, 1], -1.0)


def test_box_answers_are_the_box_head_under_the_same_cells():
    torch.manual_seed(0)
    net = BoxGrounding(GroundingNet(width=8), ElementBoxNet(width=8))
    seeds = list(range(4, 36))
    points = HeatmapSampler(net).sample(IMAGE, "click 'Save' button", seeds, 1.0)
    boxes = HeatmapSampler(net, answer="box").sample(IMAGE, "click 'Save' button", seeds, 1.0)
    assert boxes == HeatmapSampler(net, answer="box").sample(IMAGE, "click 'Save' button", seeds, 1.0)
    size = (1920, 1080)
    pp, pb = parse_answers(points, "permille", size), parse_answers(boxes, "permille", size)
    assert pb.ok.all() and all(parse_answer(t)[0] == "box" for t in boxes)
    # the boxes are the box head's, under the cells the point answers were drawn from
    with torch.no_grad():
        logits, extents = net.forward_with_boxes(*_inputs(IMAGE, "click 'Save' button"))
    cells = cells_at(logits.flatten(1), Streams(torch.tensor(seeds)).rand((3,))[None, :, 0], 1.0)
    expect = (boxes_at(extents, cells)[0] * 1000).round().long().tolist()
    assert boxes == [f"[{a}, {b}, {c}, {d}]" for a, b, c, d in expect]
    cols, rows = net.cells
    unit = torch.from_numpy(pp.points / size)
    centre = torch.stack([cells[0] % cols, cells[0] // cols], 1) + 0.5
    assert ((unit * torch.tensor([cols, rows]) - centre).abs() <= 0.5 + 0.2).all()   # 0.2: a thousandth, floored
    assert ((pb.boxes[:, :2] <= pb.boxes[:, 2:])).all()
    # greedy: the box under the greedy click
    g = HeatmapSampler(net, greedy="argmax", answer="box").sample(IMAGE, "click 'Save' button", [0], 0.0)
    expect = boxes_at(extents, logits.flatten(1).argmax(1, keepdim=True))[0, 0]
    assert g[0] == "[" + ", ".join(str(v) for v in (expect * 1000).round().long().tolist()) + "]"
    with pytest.raises(MmttsError, match="boxes"):
        HeatmapSampler(GroundingNet(width=8), answer="box")
    with pytest.raises(MmttsError, match="answer="):
        HeatmapSampler(net, answer="polygon")


def test_box_targets_give_back_each_element_box():
    from mmtts.modalities.gui.model import CELLS, element_extents
    boxes = np.array([[0, 0, 60, 40], [100.5, 30.2, 400.7, 62.9], [1800, 1000, 1920, 1080], [700, 500, 703, 503]])
    ext, inside = element_extents([boxes], np.array([[1920, 1080]]))
    cols, rows = CELLS
    assert (ext[0][:, inside[0]] > 0).all() and not inside[0, 0, cols // 2]
    for box in boxes[:3]:                              # the 3 px box holds no cell centre: no target
        cx = int((box[0] + box[2]) / 2 / 1920 * cols)
        cy = int((box[1] + box[3]) / 2 / 1080 * rows)
        got = boxes_at(ext, torch.tensor([[cy * cols + cx]]))[0, 0] * torch.tensor([1920, 1080] * 2)
        np.testing.assert_allclose(got.numpy(), box, atol=1e-3)
    assert inside[0].sum() == sum(int(((np.arange(cols) + .5) * 1920 / cols >= b[0]).__and__(
        (np.arange(cols) + .5) * 1920 / cols <= b[2]).sum() * ((np.arange(rows) + .5) * 1080 / rows >= b[1]).__and__(
        (np.arange(rows) + .5) * 1080 / rows <= b[3]).sum()) for b in boxes)


def _inputs(image, text):
    from mmtts.modalities.gui.model import image_tensor, tokenize
    return image_tensor([image]), tokenize([text])


def test_region_vote_strategy_answers_the_consensus(heatmap):
    proc = ClickProcess(heatmap, IMAGE, "click the red star icon", (1920, 1080), temperature=1.0)
    res = run_strategy(STRATEGIES.create("region-vote", n=32, alpha=50), proc, None, budget=32, seed=7)
    pop = res.population
    c = consensus(vote_boxes(pop["points"].numpy(), pop["boxes"].numpy(), 50), 1920, 1080)
    assert tuple(res.outputs[0].tolist()) == c.point
    assert res.budget["nfe"] == 32 and res.budget["verifier_calls"] == 0 and res.extra["missing"] == 0
    assert len(pop["texts"]) == 32 and parse_answers(pop["texts"], heatmap.space, (1920, 1080)).points.tolist() \
        == pop["points"].tolist()                      # the texts travel with their candidates
    # the vote share has its own field; scores are the verifier's only, and no verifier ran
    assert res.votes.tolist() == [c.max_vote / 32] and torch.isnan(res.scores).all()
    assert res.population_scores is None and res.trace == []
    # a verifier, when given, scores the samples and leaves the answer as it was
    again = run_strategy(STRATEGIES.create("region-vote", n=32), proc, RegionConsistency(1920, 1080),
                         budget=32, seed=7)
    assert torch.equal(again.outputs, res.outputs) and torch.equal(again.votes, res.votes)
    assert again.population_scores.shape == (32,) and again.budget["verifier_calls"] == 32
    assert torch.isnan(again.scores).all()
    # n from the budget when it is not given
    res = run_strategy(STRATEGIES.create("region-vote"), proc, None, budget=8, seed=0)
    assert res.extra["n"] == 8


def test_region_vote_bad_input(heatmap):
    proc = ClickProcess(heatmap, IMAGE, "x", (100, 100))
    with pytest.raises(MmttsError, match="n = 0"):
        STRATEGIES.create("region-vote", n=0)
    with pytest.raises(MmttsError, match="alpha"):
        STRATEGIES.create("region-vote", alpha=-1)
    with pytest.raises(BudgetError):
        run_strategy(STRATEGIES.create("region-vote", n=16), proc, None, budget=8)


class GarbageSampler:
    """A model that never answers with coordinates: every vote is missing."""

    space = "pixel"

    def sample(self, image, instruction, seeds, temperature):
        return ["I think it is the blue one"] * len(seeds)


def test_digit_greedy_is_not_the_argmax():
    from mmtts.modalities.gui.model import CELLS, argmax_point, greedy_digits

    logits = torch.full((1, CELLS[1], CELLS[0]), -30.0)
    logits[0, 10, 50] = 0.0                   # the single most likely cell
    logits[0, ::10, 120] = -0.5               # a column holding more mass in total
    x, y = greedy_digits(logits)[0].tolist()
    assert x * CELLS[0] // 1000 == 120 and y == 0          # greedy commits to the column's first digit
    ax, ay = (argmax_point(logits)[0] * 1000).tolist()
    assert int(ax) * CELLS[0] // 1000 == 50 and int(ay) * CELLS[1] // 1000 == 10


def test_all_missing_votes_give_no_answer_not_a_crash():
    proc = ClickProcess(GarbageSampler(), IMAGE, "x", (640, 360))
    res = run_strategy(STRATEGIES.create("region-vote", n=8), proc, RegionConsistency(640, 360),
                       budget=8, seed=0)
    assert torch.isnan(res.outputs).all() and res.extra["missing"] == 8
    assert res.population["parsed"].sum() == 0 and (res.population_scores == 0).all()


def tiny_llava():
    """A random-weight LLaVA built from configs, with a character-level tokenizer made in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
    for ch in "0123456789(), .xyclikthebuonw'":
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=["<image>"])
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg), proc


def test_transformers_sampler_on_a_tiny_random_vlm():
    model, proc = tiny_llava()
    s = TransformersSampler(model, proc, space="permille", prompt="<image>{instruction}", max_new_tokens=10)
    assert isinstance(s, ClickSampler) and str(s.space) == "permille"
    seeds = [3, 14, 15, 92, 65, 35]
    a = s.sample(IMAGE, "click the button", seeds, 1.0)
    assert len(a) == 6 and all(isinstance(t, str) for t in a)
    assert a == s.sample(IMAGE, "click the button", seeds, 1.0)
    # each answer comes from its own seed: the same answers drawn in other batches, in another order
    assert s.sample(IMAGE, "click the button", seeds[:2], 1.0) + s.sample(IMAGE, "click the button", seeds[2:], 1.0) \
        == a
    assert s.sample(IMAGE, "click the button", seeds[::-1], 1.0) == a[::-1]
    assert len(set(a)) > 1
    g = s.sample(IMAGE, "click the button", [0, 1, 2, 3], 0.0)
    assert len(g) == 4 and len(set(g)) == 1
    # whatever random weights write goes through parsing and voting without raising
    proc_ = ClickProcess(s, IMAGE, "click the button", IMAGE.size)
    res = run_strategy(STRATEGIES.create("region-vote", n=6), proc_, None, budget=6, seed=0)
    assert res.extra["voted"] + res.extra["missing"] == 6
    assert res.extra["voted"] <= int(res.population["parsed"].sum())  # parsed clicks may land off-screen
    with pytest.raises(MmttsError, match="generate"):
        TransformersSampler(torch.nn.Linear(2, 2), proc)


def test_click_process_checks_the_sampler_count():
    class Short:
        space = "pixel"

        def sample(self, image, instruction, seeds, temperature):
            return ["(1, 2)"]

    with pytest.raises(ProcessError, match="returned 1 answers for 4 seeds; a sampler gives one answer per seed"):
        run_strategy(STRATEGIES.create("region-vote", n=4), ClickProcess(Short(), IMAGE, "x", (10, 10)),
                     None, budget=4)
    with pytest.raises(MmttsError, match="grid size 0 x 10"):
        ClickProcess(Short(), IMAGE, "x", (0, 10))


def test_parser_refuses_malformed_arguments_and_drops_answers_past_the_float_range():
    with pytest.raises(MmttsError, match="texts must be a list of K answers.*got str"):
        parse_answers("(3, 4)", "pixel", (10, 10))
    with pytest.raises(MmttsError, match=r"image_size must be the screenshot's \(width, height\); got 10"):
        parse_answers(["(3, 4)"], "pixel", 10)
    with pytest.raises(MmttsError, match="grid size 10 x nan"):
        parse_answers(["(3, 4)"], "pixel", (10, float("nan")))
    p = parse_answers(["(1e308, 0.5)", "(0.25, 0.5)"], "unit", (100, 50))   # 1e308 * 100 px is past float64
    assert p.ok.tolist() == [False, True] and np.isnan(p.points[0]).all() and p.points[1].tolist() == [25.0, 25.0]
