"""Candidate noise: Streams draw Philox noise per (seed, counter), so no result depends on the batching."""

import pytest
import torch

import mmtts.kernels as K
from mmtts.core import State, Streams
from mmtts.modalities.toy_gmm import DEFAULT_MIXTURE, GMMDiffusion


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("MMTTS_KERNELS", "auto")


def _chunks(streams: Streams, sizes) -> list[Streams]:
    out, at = [], 0
    for n in sizes:
        out.append(Streams(streams.seeds[at:at + n], streams.counters[at:at + n]))
        at += n
    return out


def test_randn_is_the_candidate_noise_and_advances_every_stream():
    s = Streams.spawn(3, 6)
    s.counters += torch.tensor([0, 4, 1, 0, 9, 2])
    before = s.counters.clone()
    z = s.randn((2, 3, 5))
    assert z.shape == (6, 2, 3, 5) and z.dtype == torch.float32
    assert torch.equal(z, K.candidate_noise(s.seeds, before, (2, 3, 5)))
    assert torch.equal(s.counters, before + 1)
    assert torch.equal(Streams(s.seeds, before.clone()).randn((2, 3, 5), dtype=torch.float64), z.double())
    u = s.rand((4,))
    assert u.dtype == torch.float64 and torch.equal(u, K.philox_uniform_reference(s.seeds, before + 1, 4))
    assert torch.equal(s.counters, before + 2)
    assert Streams.spawn(3, 6).rand().shape == (6,)


@pytest.mark.parametrize("draw", ["randn", "rand"])
def test_rows_depend_only_on_their_stream(draw):
    """Same streams, drawn in one batch, in chunks, one by one or in another order: the same rows."""
    shape = (3, 7)
    full = Streams.spawn(11, 10)
    full.counters += torch.arange(10) * 3

    def draws(streams, times=3):
        return torch.stack([getattr(streams, draw)(shape) for _ in range(times)], dim=1)

    want = draws(full.clone())
    for sizes in ([4, 6], [1] * 10, [7, 3]):
        got = torch.cat([draws(part) for part in _chunks(full.clone(), sizes)])
        assert torch.equal(got, want), sizes
    perm = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    shuffled = Streams(full.seeds[perm], full.counters[perm])
    assert torch.equal(draws(shuffled), want[perm])
    assert not torch.equal(want[0], want[1]) and not torch.equal(want[0, 0], want[0, 1])


def _run_image(proc, streams: Streams, perm=None):
    """init, two steps, a perturbation, one step, a re-noise and the rest of the trajectory."""
    st = proc.init(streams)
    if perm is not None:
        st = st.select(perm)
    st = proc.step(proc.step(st))
    st = proc.step(proc.perturb(st, 0.4))
    st = proc.renoise(st, 2)
    while int(st.stage.min()) < proc.num_stages:
        st = proc.step(st)
    return st.data["x"], st.data["x0"]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_results_do_not_depend_on_batching(eta):
    from diffusers import DDIMScheduler

    from mmtts.modalities.image import ImageProcess, schedule_from_scheduler

    schedule = schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100, clip_sample=True), 5, eta=eta)
    proc = ImageProcess(lambda x, t, c: 0.7 * x - 0.01 * t.reshape(-1, 1, 1, 1), schedule, (2, 5, 3))
    whole = _run_image(proc, Streams.spawn(4, 6))
    for sizes in ([2, 4], [1, 1, 3, 1]):
        parts = [_run_image(proc, Streams.spawn(4, n, start=sum(sizes[:i]))) for i, n in enumerate(sizes)]
        for got, want in zip((torch.cat(p) for p in zip(*parts)), whole):
            assert torch.equal(got, want), sizes
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = _run_image(proc, Streams.spawn(4, 6), perm)
    for got, want in zip(shuffled, whole):
        assert torch.equal(got, want[perm])


@pytest.mark.parametrize("sampler", ["exact", "ddim"])
def test_gmm_results_do_not_depend_on_batching(sampler):
    proc = GMMDiffusion(DEFAULT_MIXTURE, 6, sampler=sampler, eta=1.0)

    def run(streams):
        st = proc.init(streams)
        while int(st.stage.min()) < proc.num_stages:
            st = proc.step(st)
        return st.data["x"]

    whole = run(Streams.spawn(2, 9))
    parts = torch.cat([run(Streams.spawn(2, n, start=s)) for s, n in ((0, 4), (4, 1), (5, 4))])
    assert torch.equal(parts, whole)


def test_streams_of_a_state_carry_their_noise():
    """A candidate copied into another batch draws what it would have drawn in its own."""
    st = State.fresh({"x": torch.zeros(5, 3)}, Streams.spawn(8, 5))
    picked = st.select(torch.tensor([4, 1]))
    assert torch.equal(picked.streams.randn((3,)), st.streams.clone().randn((3,))[[4, 1]])
