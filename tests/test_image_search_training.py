"""The shared training helpers of the search tasks (mmtts/tasks/training.py) and their task base class."""

import pytest
import torch
from torch import nn

from mmtts.tasks.cache import ModelCache
from mmtts.tasks.image_search import SearchTask
from mmtts.tasks.training import (adamw_one_cycle, cached_model, fit, fit_noisy_classifier, forward_diffusion,
                                  optimizer_step, seeded_model)


def test_forward_diffusion_draws_t_then_eps_and_mixes_per_sample():
    abar = torch.linspace(0.999, 0.01, 50)
    x0 = torch.randn(3, 1, 4, 5, 5)  # a clip batch: the mixing broadcasts over every dimension but the first
    t, eps, xt = forward_diffusion(x0, abar, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(t, torch.randint(0, 50, (3,), generator=g))
    assert torch.equal(eps, torch.randn(x0.shape, generator=g))
    for i in range(3):
        a = abar[t[i]]
        assert torch.allclose(xt[i], a.sqrt() * x0[i] + (1 - a).sqrt() * eps[i])


def _linear(seed=0):
    return seeded_model(lambda: nn.Linear(4, 1), seed)[0]


def test_optimizer_step_clips_the_gradient_norm_only_when_asked_and_steps_the_schedule():
    x = torch.full((8, 4), 10.0)
    moves = {}
    for clip in (None, 1e-3):
        model = _linear()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        optimizer_step(model(x).pow(2).mean(), model, opt, sched, clip=clip)
        moves[clip] = float(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm())
        assert opt.param_groups[0]["lr"] == 0.5
    assert moves[None] > 1.0
    assert moves[1e-3] == pytest.approx(1e-3, rel=1e-4)


def test_fit_runs_the_steps_in_order_and_is_deterministic():
    def train(seed):
        model, g = seeded_model(lambda: nn.Linear(4, 1), seed)
        opt, sched = adamw_one_cycle(model, 1e-2, 40)
        seen = []

        def loss_at(i):
            seen.append(i)
            x = torch.randn(16, 4, generator=g)
            return (model(x).squeeze(1) - x.sum(1)).pow(2).mean()

        fit(model, opt, sched, 40, loss_at, "test", every=5, clip=1.0)
        return seen, model.state_dict()

    seen, a = train(0)
    _, b = train(0)
    _, c = train(1)
    assert seen == list(range(40))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_noisy_classifier_learns_and_repeats_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 2, generator=g) * 0.3 + (y[:, None] * 2 - 1).float()  # two separated clusters
    make = lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))  # noqa: E731
    a = fit_noisy_classifier(make, x, y, epochs=5, seed=3, description="test", batch=32)
    b = fit_noisy_classifier(make, x, y, epochs=5, seed=3, description="test", batch=32)
    c = fit_noisy_classifier(make, x, y, epochs=5, seed=4, description="test", batch=32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    model = make()
    model.load_state_dict(a)
    assert (model.eval()(x).argmax(1) == y).float().mean() > 0.95


def test_cached_model_trains_once_and_loads_in_eval_mode(tmp_path):
    calls = []

    def train():
        calls.append(1)
        return _linear(5).state_dict()

    cache = ModelCache(tmp_path)
    first = cached_model(cache, nn.Linear(4, 1).train(), "net", {"seed": 5}, train)
    again = cached_model(cache, nn.Linear(4, 1), "net", {"seed": 5}, train)
    assert len(calls) == 1 and not first.training and not again.training
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), _linear(5).parameters()))
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), first.parameters()))


class _Toy(SearchTask):
    """A search task of one cached model.

    Args:
        cache: where trained weights are kept.
        quick: the quick config.
    """

    methods = ("best-of-n",)
    full_config = {"seed": 0}
    quick_config = {"seed": 1}
    model_names = ("toy-net",)

    def load_models(self):
        self.loads = getattr(self, "loads", 0) + 1
        return {"net": cached_model(self.cache, nn.Linear(4, 1), "toy-net", self.cfg,
                                    lambda: _linear(self.cfg["seed"]).state_dict())}

    def run(self, method, setting, budget, seed):
        return {}


def test_search_task_loads_its_models_once_and_picks_its_config(tmp_path):
    full, quick = _Toy(ModelCache(tmp_path)), _Toy(ModelCache(tmp_path), quick=True)
    assert full.cfg == {"seed": 0} and quick.cfg == {"seed": 1}
    assert quick.prepare() == ["toy-net"]
    assert quick.models() is quick.models() and quick.loads == 1
    assert not torch.equal(full.models()["net"].weight, quick.models()["net"].weight)
    assert quick.samples == {}
    assert quick.references([8, 24]) == {"ceiling (sup reward)": [0.0, 0.0]}
    assert (quick.baseline, quick.primary_metric) == ("best-of-n", "reward")


def test_one_cycle_schedule_needs_a_warm_up_step():
    from mmtts.core.errors import MmttsError
    from mmtts.tasks.training import adamw_one_cycle
    with pytest.raises(MmttsError, match="more than 20 steps"):
        adamw_one_cycle(torch.nn.Linear(2, 2), 1e-3, 20)
    opt, sched = adamw_one_cycle(torch.nn.Linear(2, 2), 1e-3, 21)
    for _ in range(21):
        opt.step()
        sched.step()
