"""EvoSearch lineages: spread selection over the descendants of distinct initial noises, and the reduction to
selection by score alone (``lineages=1`` / ``published=True``) reproduces the runs recorded before lineages."""

from collections import Counter

import pytest
import torch
from diffusers import DDIMScheduler

import mmtts
from mmtts.core import FunctionVerifier
from mmtts.core.errors import SettingsError
from mmtts.modalities.image import ImageProcess, schedule_from_scheduler
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, DEFAULT_TARGET, GMMDiffusion, QuadraticReward
from mmtts.strategies.evosearch import EvoSearch

from image_fixtures import tiny_unet

REWARD = QuadraticReward(DEFAULT_TARGET)
MEAN = FunctionVerifier(lambda x: x.double().mean(dim=tuple(range(1, x.ndim))), name="mean")
PROCESSES = {
    "gmm": lambda: GMMDiffusion(DEFAULT_MIXTURE, 10, sampler="ddim", eta=0.0),
    "gmm_sto": lambda: GMMDiffusion(DEFAULT_MIXTURE, 10, sampler="ddim", eta=1.0),
    "img": lambda: ImageProcess(tiny_unet(), schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), 5),
                                (1, 8, 8)),
}
# (process, settings, budget, seed) -> (kept scores, kept candidate ids, NFE, verifier calls), recorded with the
# implementation that selected by score alone, before lineages existed
RECORDED = [
    (("gmm", {"n": 8, "noise_generations": 0, "latent_scale": 0.5, "keep": 4}, 160, 0),
     ([-0.0193405845065299, -0.0193405845065299, -0.023825991703014866, -0.023825991703014866],
      [7623769382415823620, 1234303466292994891, 8843595529441654269, 3736536108091951503], 80, 80)),
    (("gmm", {"n": 8, "noise_generations": 0, "latent_scale": 0.5, "keep": 4}, 160, 3),
     ([-0.11447603487767083, -0.11447603487767083, -0.13312855461334996, -0.13312855461334996],
      [8087736255995732358, 4818950343361204819, 1686809570300095587, 1846166915655998583], 80, 80)),
    (("gmm", {"n": 6, "keep": 3}, 300, 1),
     ([-0.15682111940712037, -0.15682111940712037, -0.3012659727628776],
      [9034673442273975101, 5460187742243858518, 7825155402732595322], 264, 75)),
    (("gmm", {"n": 6, "noise_generations": 2, "stages": [4, 8], "keep": 2}, 300, 2),
     ([-0.38387401295290086, -0.4602830325058971], [2802537284300558369, 2519851554991904727], 146, 23)),
    (("gmm", {"n": 5, "elites": 0, "noise_generations": 0, "initial": 9}, 100, 5),
     ([-0.34341274447669856], [8032868928910447183], 54, 54)),
    (("gmm_sto", {"n": 8, "noise_generations": 0, "keep": 4, "tournament": 3, "archive_fraction": 0.5}, 200, 7),
     ([-0.0005475728137594607] * 4,
      [5992173780726947933, 9212520905297445848, 5678736667555248744, 812192024646080621], 80, 80)),
    (("img", {"n": 6, "noise_generations": 0, "latent_scale": 0.5, "keep": 4}, 60, 0),
     ([0.4888910660520196, 0.4888910660520196, 0.4885454108007252, 0.4885454108007252],
      [5156840008125216348, 9012290111788053233, 6537616320684325150, 1862182358243794324], 30, 30)),
    (("img", {"n": 4, "keep": 2}, 80, 1),
     ([0.6082257255911827, 0.6082257255911827], [680745862107201392, 8891529816936359506], 66, 26)),
]


@pytest.mark.parametrize("off", [{"lineages": 1}, {"published": True}])
@pytest.mark.parametrize("case, recorded", RECORDED, ids=[f"{c[0]}-{c[3]}" for c, _ in RECORDED])
def test_selection_by_score_alone_reproduces_the_recorded_runs(case, recorded, off):
    process, settings, budget, seed = case
    scores, ids, nfe, calls = recorded
    verifier = MEAN if process == "img" else REWARD
    r = mmtts.search(PROCESSES[process](), verifier, EvoSearch(**settings, **off), budget=budget, seed=seed)
    assert r.lineage["ids"].tolist() == ids and (r.budget["nfe"], r.budget["verifier_calls"]) == (nfe, calls)
    if process == "img":  # a network's float32 output: equal to its last bits on one machine, not across builds
        assert r.scores.tolist() == pytest.approx(scores, rel=1e-6, abs=1e-9)
    else:
        assert r.scores.tolist() == scores


class GenerationLog(GMMDiffusion):
    """The mixture's DDIM process, recording the lineages of every batch it steps."""

    def __init__(self):
        super().__init__(DEFAULT_MIXTURE, 10, sampler="ddim", eta=0.0)
        self.batches: list[list[int]] = []

    def step(self, state):
        self.batches.append(state.origin.tolist())
        return super().step(state)


@pytest.mark.parametrize("seed", [0, 3])
def test_lineages_spread_every_generation_and_the_kept_outputs(seed):
    """Selection by score alone keeps four copies of one lineage here; with lineages=4 each trajectory
    generation of 8 holds at least 4 lineages (2 places each at most) and the 4 kept come from 4 lineages."""
    alone = mmtts.search(GenerationLog(), REWARD, "evosearch", n=8, noise_generations=0, latent_scale=0.5, keep=4,
                         lineages=1, budget=160, seed=seed)
    assert len(set(alone.lineage["origin"].tolist())) == 1 and alone.extra["kept_lineages"] == 1
    p = GenerationLog()
    r = mmtts.search(p, REWARD, "evosearch", n=8, noise_generations=0, latent_scale=0.5, keep=4, budget=160,
                     seed=seed)
    assert r.settings["lineages"] == 4  # the default: one lineage per kept output
    assert len(set(r.lineage["origin"].tolist())) == 4 == r.extra["kept_lineages"]
    assert len(p.batches) == 10 and p.batches[0] == list(range(8))  # the fresh candidates, then 9 generations
    for batch in p.batches[1:]:
        held = Counter(batch)
        assert len(held) >= 4 and max(held.values()) <= 2
    assert (r.budget["nfe"], r.budget["verifier_calls"]) == (alone.budget["nfe"], alone.budget["verifier_calls"])
    # the best candidate ever finished comes first, and the rest best first
    finished = [s for e in r.trace for s in e["scores"]]
    assert r.best_score == max(finished) and r.scores.tolist() == sorted(r.scores.tolist(), reverse=True)
    again = mmtts.search(GenerationLog(), REWARD, "evosearch", n=8, noise_generations=0, latent_scale=0.5, keep=4,
                         budget=160, seed=seed)
    assert torch.equal(again.outputs, r.outputs) and torch.equal(again.lineage["ids"], r.lineage["ids"])


def test_lineages_with_noise_generations_keep_distinct_lineages_from_the_archive():
    p = GMMDiffusion(DEFAULT_MIXTURE, 10, sampler="ddim", eta=0.0)
    r = mmtts.search(p, REWARD, "evosearch", n=6, keep=3, budget=300, seed=1)
    assert r.extra["kept_lineages"] == 3 == len(set(r.lineage["origin"].tolist()))
    finished = [s for e in r.trace for s in e["scores"]]
    assert r.best_score == max(finished)


def test_fewer_lineages_than_asked_fill_by_rank():
    """Two initial candidates cannot spread over four lineages: the places the cap cannot fill go by rank."""
    p = GenerationLog()
    r = mmtts.search(p, REWARD, "evosearch", n=6, initial=2, noise_generations=0, keep=4, budget=100, seed=2)
    assert len(r.outputs) == 4 and r.extra["kept_lineages"] == 2
    assert all(len(b) == 6 and set(b) == {0, 1} for b in p.batches[1:])


def test_lineage_settings_are_checked():
    assert EvoSearch(keep=3).lineages == 3 and EvoSearch().lineages == 1
    assert EvoSearch(keep=3, published=True).lineages == 1 and EvoSearch(keep=3, lineages=2).lineages == 2
    with pytest.raises(SettingsError, match="lineages >= 1"):
        EvoSearch(lineages=0)
    with pytest.raises(SettingsError, match="published=True selects by score alone.*lineages=3"):
        EvoSearch(keep=4, lineages=3, published=True)
    with pytest.raises(SettingsError, match="published='yes' must be True or False"):
        EvoSearch(published="yes")


def test_image_search_sample_grid(tmp_path):
    pytest.importorskip("matplotlib")
    from mmtts.tasks.image_search import sample_grid
    samples = {(m, 640, s): torch.rand(1, 16, 16) for m in ("best-of-n", "evosearch") for s in (0, 1, 2)}
    path = sample_grid(samples, ["best-of-n", "evosearch"], [0, 1, 2], 640, "640 NFE", tmp_path / "grid.png")
    assert path == tmp_path / "grid.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    del samples[("evosearch", 640, 2)]
    assert sample_grid(samples, ["best-of-n", "evosearch"], [0, 1, 2], 640, "640 NFE", tmp_path / "no.png") is None
    assert not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("stop_at", [1, 4])
def test_a_resumed_lineage_run_gives_the_uninterrupted_result(tmp_path, stop_at):
    """The caps are rebuilt from each generation's own lineages, so nothing beyond the loop state is saved."""
    p = GMMDiffusion(DEFAULT_MIXTURE, 10, sampler="ddim", eta=0.0)
    kw = dict(n=8, noise_generations=0, latent_scale=0.5, keep=4, budget=160, seed=5)
    full = mmtts.search(p, REWARD, "evosearch", **kw)

    def stop(count):
        if count == stop_at:
            raise KeyboardInterrupt

    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        mmtts.search(p, REWARD, "evosearch", checkpoint=path, on_checkpoint=stop, **kw)
    resumed = mmtts.search(p, REWARD, "evosearch", checkpoint=path, resume=True, **kw)
    assert torch.equal(full.outputs, resumed.outputs) and torch.equal(full.lineage["ids"], resumed.lineage["ids"])
    assert full.extra == resumed.extra and full.extra["kept_lineages"] == 4
