"""GUI grounding: parse click answers, vote over them (GUI-RC), adapt at test time (GUI-RCPO).

    sampler = TransformersSampler(model, processor, space="permille")   # or HeatmapSampler(net)
    process = ClickProcess(sampler, image, "click the Save button", image.size)
    result = mmtts.search(process, None, "region-vote", budget=64, n=64, alpha=50)   # no verifier: a vote
    x, y = result.outputs[0]                                            # pixels of the screenshot
    result.votes[0]                                                     # the winning region's vote share

The voting itself is modality-free and lives in :mod:`mmtts.strategies.region_vote`;
GUI-RCPO is the ``gui-rcpo`` adapter (:mod:`mmtts.adapters.gui_rcpo`).
"""

from .coords import CoordSpace
from .elements import DetectedElements, ElementList, ElementProposals
from .data import (GroundingExample, grounding_accuracy, load_rcpo_jsonl, load_screenspot, load_screenspot_pro,
                   point_in_box, write_screenspot)
from .model import BoxGrounding, ElementBoxNet, GroundingNet
from .parse import ParsedAnswers, parse_answer, parse_answers
from .process import ClickProcess
from .sampler import ClickSampler, HeatmapSampler, TransformersSampler

__all__ = ["BoxGrounding", "ClickProcess", "ClickSampler", "CoordSpace", "DetectedElements", "ElementBoxNet",
           "ElementList", "ElementProposals", "GroundingExample", "GroundingNet", "HeatmapSampler",
           "ParsedAnswers", "TransformersSampler", "grounding_accuracy", "load_rcpo_jsonl", "load_screenspot",
           "load_screenspot_pro", "parse_answer", "parse_answers", "point_in_box", "write_screenspot"]
