"""The two video Processes: cost accounting against the model's forwards, determinism, chunked decoding, previews."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

import mmtts
from mmtts.core import BudgetError, FunctionVerifier, MmttsError, Streams
from mmtts.modalities.image import schedule_from_scheduler
from mmtts.modalities.video import FrameARProcess, VideoProcess, decode_frames

from image_fixtures import tiny_vae

MEAN = FunctionVerifier(lambda v: v.float().mean(tuple(range(1, v.ndim))), name="brightness")


def frame_unet(channels=1, unit=1, context=2, size=8):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=(unit + context) * channels, out_channels=unit * channels,
                       block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4).eval()


class ClipModel(torch.nn.Module):
    """A whole-clip denoiser: a 2D UNet applied to every frame, plus a temporal mix (frames see each other)."""

    def __init__(self, channels=1):
        super().__init__()
        self.unet = frame_unet(channels, unit=1, context=0)

    def forward(self, x, t, cond):
        b, c, f, h, w = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        out = self.unet(flat, t.repeat_interleave(f)).sample.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        return out + 0.1 * x.mean(2, keepdim=True)


def schedule(steps=4, eta=0.0):
    return schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), steps, eta=eta)


def counting(module):
    """A forward pre-hook counting candidate forwards (batch rows) through ``module``."""
    seen = {"rows": 0}

    def hook(_, args, kwargs):
        seen["rows"] += (args[0] if args else kwargs["sample"]).shape[0]
    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def ar_process(eta=0.0, vae=None, chunk=8, unit=1, frames=4, context=2):
    channels = 4 if vae is not None else 1
    return FrameARProcess(frame_unet(channels, unit, context), schedule(3, eta), (channels, 8, 8), frames,
                          unit_frames=unit, context_frames=context, vae=vae, decode_chunk=chunk)


def clip_process(eta=0.0, vae=None, chunk=8, frames=3):
    channels = 4 if vae is not None else 1
    return VideoProcess(ClipModel(channels), schedule(4, eta), (channels, frames, 8, 8), vae=vae, decode_chunk=chunk)


STRATEGIES = [("best-of-n", {}, 0.0), ("beam", {"beams": 2}, 1.0), ("particle-filter", {}, 1.0),
              ("evosearch", {"n": 3}, 0.0)]


@pytest.mark.parametrize("strategy, settings, eta", STRATEGIES)
def test_frame_ar_nfe_counted_equals_forwards_made(strategy, settings, eta):
    proc = ar_process(eta)
    seen = counting(proc.model)
    assert proc.nfe_per_candidate() == proc.num_stages == 4 * 3
    r = mmtts.search(proc, MEAN, strategy, budget=12 * 5, seed=0, **settings)
    assert r.budget["nfe"] == seen["rows"] <= 60
    assert r.outputs.shape[1:] == (1, 4, 8, 8)


@pytest.mark.parametrize("strategy, settings, eta", STRATEGIES)
def test_whole_clip_nfe_counted_equals_forwards_made(strategy, settings, eta):
    proc = clip_process(eta)
    seen = counting(proc.model)
    r = mmtts.search(proc, MEAN, strategy, budget=4 * 5, seed=0, **settings)
    assert r.budget["nfe"] == seen["rows"] <= 20
    assert r.outputs.shape[1:] == (1, 3, 8, 8)


def run_all(proc, n, seed=0):
    st = proc.init(Streams.spawn(seed, n))
    while int(st.stage.min()) < proc.num_stages:
        st = proc.step(st)
    return proc.finish(st)


@pytest.mark.parametrize("make", [ar_process, clip_process])
def test_same_seed_same_clip_whatever_the_batch(make):
    proc = make(eta=1.0)
    a, b = run_all(proc, 3), run_all(proc, 3)
    assert torch.equal(a, b)
    alone = run_all(proc, 1)  # candidate 0 of seed 0 is the same clip in a batch of one
    assert torch.allclose(a[:1], alone, atol=1e-6)
    assert not torch.equal(a[0], a[1])
    r1 = mmtts.search(proc, MEAN, "best-of-n", budget=proc.nfe_per_candidate() * 4, seed=3, batch_size=1)
    r4 = mmtts.search(proc, MEAN, "best-of-n", budget=proc.nfe_per_candidate() * 4, seed=3, batch_size=4)
    assert torch.allclose(r1.outputs, r4.outputs, atol=1e-6) and torch.allclose(r1.scores, r4.scores, atol=1e-6)


@pytest.mark.parametrize("make", [ar_process, clip_process])
def test_chunked_decode_equals_full_decode(make):
    vae = tiny_vae()
    full, chunked = make(vae=vae, chunk=None), make(vae=vae, chunk=1)
    st = full.init(Streams.spawn(0, 2))
    for _ in range(3):
        st = full.step(st)
    assert torch.allclose(full.preview(st), chunked.preview(st), atol=1e-6)
    latents = torch.randn(2, 4, 5, 8, 8)
    ref = decode_frames(latents, vae, chunk=None)
    for chunk in (1, 2, 3, 7):
        assert torch.allclose(decode_frames(latents, vae, chunk=chunk), ref, atol=1e-6)
    assert ref.shape == (2, 3, 5, 16, 16) and 0 <= float(ref.min()) and float(ref.max()) <= 1


def test_decodes_are_counted_per_candidate():
    proc = ar_process(vae=tiny_vae(), chunk=2)
    r = mmtts.search(proc, MEAN, "best-of-n", budget=proc.nfe_per_candidate() * 3, seed=0)
    assert r.budget["decodes"] == 3 and r.outputs.shape == (1, 3, 4, 16, 16)


def test_frame_ar_model_sees_the_frames_before_its_unit():
    seen = []

    def model(x, t, ctx):
        seen.append(ctx.clone())
        return torch.zeros_like(x)  # epsilon 0: each unit denoises to its (clipped, scaled) noise

    proc = FrameARProcess(model, schedule(2), (1, 4, 4), 6, unit_frames=2, context_frames=3)
    assert (proc.num_units, proc.stages_per_unit, proc.num_stages) == (3, 2, 6)
    st = proc.init(Streams.spawn(0, 2))
    for _ in range(6):
        st = proc.step(st)
    video = st.data["video"]
    assert all(float(c.abs().sum()) == 0 for c in seen[:2])  # the first unit has no past
    # unit 1 (frames 2, 3) sees frames 1, 0 and a zero frame; unit 2 (frames 4, 5) sees frames 3, 2, 1
    assert torch.equal(seen[2].reshape(2, 3, 4, 4)[:, 0], video[:, 0, 1])
    assert torch.equal(seen[2].reshape(2, 3, 4, 4)[:, 1], video[:, 0, 0])
    assert float(seen[2].reshape(2, 3, 4, 4)[:, 2].abs().sum()) == 0
    assert torch.equal(seen[4].reshape(2, 3, 4, 4), video[:, 0, [3, 2, 1]].reshape(2, 3, 4, 4))


def test_frame_ar_preview_is_the_partial_video():
    proc = ar_process(unit=2, frames=4)
    st = proc.init(Streams.spawn(0, 2))
    with pytest.raises(MmttsError, match="first denoising step"):
        proc.preview(st)
    st = proc.step(st)
    p = proc.preview(st)
    assert p.shape == (2, 1, 2, 8, 8) and proc.frames_through(1) == 2
    assert torch.equal(p, decode_frames(proc.to_frames(st.data["x0"])))  # the unit's x0-hat
    for _ in range(2):
        st = proc.step(st)
    assert torch.equal(proc.preview(st), decode_frames(st.data["video"][:, :, :2]))  # unit 0 finished
    st = proc.step(st)
    assert proc.preview(st).shape[2] == 4
    other = proc.step(proc.init(Streams.spawn(1, 1)))  # in unit 0 while st is in unit 1
    with pytest.raises(MmttsError, match="same unit"):
        proc.preview(mmtts.State.cat([st, other]))


def test_perturb_at_a_unit_boundary_draws_the_next_units_noise():
    proc = ar_process(eta=0.0)
    st = proc.init(Streams.spawn(0, 2))
    for _ in range(3):
        st = proc.step(st)  # unit 0 done: x is unit 1's initial noise
    kids = st.resample([0, 0, 1], fork_all=True)
    moved = proc.perturb(kids, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(moved.data["x"][0], st.data["x"][0]) and torch.equal(moved.data["x"][2], st.data["x"][1])
    assert not torch.allclose(moved.data["x"][1], st.data["x"][0])
    assert torch.equal(moved.stage, kids.stage) and torch.equal(moved.data["video"], kids.data["video"])
    assert proc.is_stochastic(0) is False and ar_process(eta=1.0).is_stochastic(4) is True


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(MmttsError, match="at least one frame"):
        VideoProcess(ClipModel(), schedule(), (1, 0, 8, 8))
    with pytest.raises(MmttsError, match="at least one frame"):
        FrameARProcess(frame_unet(), schedule(), (1, 8, 8), 0)
    with pytest.raises(MmttsError, match="divisor"):
        FrameARProcess(frame_unet(), schedule(), (1, 8, 8), 5, unit_frames=2)
    with pytest.raises(MmttsError, match="channels, frames, height, width"):
        VideoProcess(ClipModel(), schedule(), (1, 8, 8))
    with pytest.raises(MmttsError, match="zero frames"):
        decode_frames(torch.zeros(1, 1, 0, 8, 8))
    proc = ar_process()
    with pytest.raises(BudgetError, match="below the cost of one candidate"):
        mmtts.search(proc, MEAN, "best-of-n", budget=proc.nfe_per_candidate() - 1, seed=0)
    wrong = FunctionVerifier(lambda v: torch.zeros(len(v) + 1), name="wrong")
    with pytest.raises(mmtts.core.VerifierError, match="wrong"):
        mmtts.search(proc, wrong, "best-of-n", budget=proc.nfe_per_candidate(), seed=0)


def test_frame_ar_candidates_in_different_units_step_together_as_alone():
    proc = ar_process(eta=1.0)
    a = proc.init(Streams.spawn(0, 2))
    for _ in range(4):
        a = proc.step(a)  # unit 1, step 1
    b = proc.step(proc.init(Streams.spawn(1, 1)))  # unit 0, step 1
    both = proc.step(mmtts.State.cat([a.select([0, 1]), b.select([0])]))
    alone = mmtts.State.cat([proc.step(a.select([0, 1])), proc.step(b.select([0]))])
    for k in ("x", "x0", "video"):
        assert torch.allclose(both.data[k], alone.data[k], atol=1e-6), k
    assert torch.equal(both.stage, torch.tensor([5, 5, 2]))
