"""A run stopped mid-way and resumed from its checkpoint gives the uninterrupted result."""

import pytest
import torch

import mmtts
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward

from helpers import Stop, stop_after

P = GMMDiffusion(DEFAULT_MIXTURE, 8)
R = QuadraticReward(DEFAULT_TARGET)
CASES = [("best-of-n", {"batch_size": 5}), ("particle-filter", {"ess_threshold": 0.9}), ("beam", {"beams": 3}),
         ("zero-order", {"neighbours": 4}), ("paths", {"width": 3}), ("evosearch", {"n": 6})]


def comparable(r):
    return {"outputs": r.outputs, "scores": r.scores, "ids": r.lineage["ids"],
            "trace": [{k: v for k, v in e.items() if k != "seconds"} for e in r.trace],
            "nfe": r.budget["nfe"], "calls": r.budget["verifier_calls"], "extra": r.extra}


@pytest.mark.parametrize("strategy, kw", CASES)
def test_resume_gives_the_identical_result(tmp_path, strategy, kw):
    full = mmtts.search(P, R, strategy, budget=8 * 30, seed=3, **kw)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        mmtts.search(P, R, strategy, budget=8 * 30, seed=3, checkpoint=path, on_checkpoint=stop_after(2), **kw)
    assert path.exists()
    resumed = mmtts.search(P, R, strategy, budget=8 * 30, seed=3, checkpoint=path, resume=True, **kw)
    a, b = comparable(full), comparable(resumed)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        mmtts.search(P, R, "best-of-n", budget=240, seed=3, batch_size=5, checkpoint=path,
                     on_checkpoint=stop_after(1))
    with pytest.raises(mmtts.MmttsError, match="different run"):
        mmtts.search(P, R, "best-of-n", budget=240, seed=4, batch_size=5, checkpoint=path, resume=True)
    with pytest.raises(mmtts.MmttsError, match="needs checkpoint"):
        mmtts.search(P, R, "best-of-n", budget=240, resume=True)


def test_resume_without_a_file_starts_fresh(tmp_path):
    path = tmp_path / "none.ckpt"
    a = mmtts.search(P, R, "best-of-n", budget=80, seed=1, checkpoint=path, resume=True)
    b = mmtts.search(P, R, "best-of-n", budget=80, seed=1)
    assert torch.equal(a.outputs, b.outputs)
    assert path.exists()
