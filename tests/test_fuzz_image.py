"""Property-based fuzzing of image search: a hand-built ImageProcess under every image strategy.

The process is built by hand, as a user would: a tiny diffusers
``UNet2DModel`` (in float32, float16 or float64) or a stub denoiser (a
function, sometimes one that returns NaN, the wrong shape, an integer tensor,
or raises), a DDIM or DDPM schedule of 1 to 4 steps, and random latent
shapes (channels-last ones, zero or fractional sizes), latent dtypes (float64,
half, bfloat16, integers), conditioning (labels, embeddings in float64, NaN,
strings), guidance scales and devices. It is searched with every image
strategy at random budgets (0, tiny, huge with a deadline, NaN) and seeds.
Every property is: the call either succeeds with outputs that pass their
invariants (images in [0, 1] of the latent's size, one float64 score per
output, best first, no NaN or +inf, the budget kept), or raises an
:class:`~mmtts.core.errors.MmttsError`; never a raw torch or Python error and
never a hang. Conversions that are unambiguous (latents or embeddings in
another float precision than the model's) must succeed. Example counts follow
the hypothesis profile registered in conftest.py: ``ci`` by default,
``HYPOTHESIS_PROFILE=long`` for the long run.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmtts
from mmtts.core import Budget, FunctionVerifier, MmttsError
from mmtts.modalities.image import ImageProcess, schedule_from_scheduler

from image_fixtures import tiny_unet
from test_fuzz_search import HUGE, SEEDS, SETTINGS, SLACK_SECONDS, mostly, run_checked

EXAMPLES = settings.default.max_examples
NAN = float("nan")
BRIGHTNESS = FunctionVerifier(lambda x: x.flatten(1).mean(1), name="brightness")
STRATEGIES = ["best-of-n", "beam", "particle-filter", "zero-order", "paths", "evosearch"]


@functools.lru_cache(maxsize=None)
def unet(dtype: torch.dtype) -> torch.nn.Module:
    """The tiny 1-channel 8x8 UNet2DModel in ``dtype`` (built once per dtype)."""
    return tiny_unet().to(dtype)


def _scaled(x, t, c):
    return 0.1 * x


def _nan_late(x, t, c):
    return torch.where(t.view(-1, *[1] * (x.ndim - 1)) < 40, torch.full_like(x, NAN), 0.1 * x)


def _raises(x, t, c):
    raise ValueError("the user's model broke")


STUBS = {
    "scaled": _scaled,
    "nan_late": _nan_late,
    "wrong_shape": lambda x, t, c: x[:, :1, :1],
    "integer": lambda x, t, c: x.to(torch.int64),
    "not_a_tensor": lambda x, t, c: [0.0] * len(x),
    "raises": _raises,
}
GOOD_STUBS = ["scaled"] * 8 + ["nan_late"]


@functools.lru_cache(maxsize=None)
def schedule(kind: str, steps: int):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddpm":
        return schedule_from_scheduler(DDPMScheduler(num_train_timesteps=100), steps)
    return schedule_from_scheduler(DDIMScheduler(num_train_timesteps=100), steps, eta=1.0 if kind == "ddim" else 0.0)


LATENT_DTYPES = mostly(st.sampled_from([torch.float32] * 3 + [torch.float64, torch.float16, torch.bfloat16]),
                       st.sampled_from([torch.int64, torch.bool, "float32", None]), 10)
BAD_SHAPES = st.sampled_from([(8, 8, 1), (3, 8, 8), (1, 0, 8), (1, 8), (1, 8.5, 8), (1, -8, 8), "1x8x8", None,
                              (1, 7, 7), (True, 8, 8)])


@st.composite
def processes(draw):
    """Keyword arguments of ImageProcess: mostly valid, sometimes malformed."""
    kind = draw(st.sampled_from(["unet"] * 2 + ["stub"] * 3))
    if kind == "unet":
        model = unet(draw(st.sampled_from([torch.float32] * 3 + [torch.float16, torch.float64])))
        shape = draw(mostly(st.just((1, 8, 8)), BAD_SHAPES, 15))
        cond = draw(mostly(st.none(), st.sampled_from([3, "cat", torch.ones(2, 4)]), 8))
    else:
        stub = draw(mostly(st.sampled_from(GOOD_STUBS), st.sampled_from(sorted(STUBS)), 15))
        model = STUBS[stub]
        shape = draw(mostly(st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8)), BAD_SHAPES, 10))
        cond = draw(mostly(st.sampled_from([None, None, 2, torch.randn(3, 4, dtype=torch.float64)]),
                           st.sampled_from(["cat", torch.full((2, 2), NAN), torch.ones(2, dtype=torch.bool)]), 8))
    kw = {"model": model, "schedule": schedule(draw(st.sampled_from(["ddim", "ddim", "ddim0", "ddpm"])),
                                               draw(st.integers(1, 4))),
          "sample_shape": shape, "dtype": draw(LATENT_DTYPES), "cond": cond}
    if draw(st.integers(0, 9)) == 0:
        kw["guidance_scale"], kw["uncond"] = draw(st.sampled_from([(3.0, 0), (3.0, None), (NAN, 0), (2.0, cond)]))
    if draw(st.integers(0, 19)) == 0:
        kw["device"] = draw(st.sampled_from(["cuda:3", "nodevice", 7]))
    if draw(st.integers(0, 19)) == 0:
        kw["output_range"] = draw(st.sampled_from([(1.0, -1.0), (0.0, NAN), "01", (0.0, 1.0)]))
    return kw


@st.composite
def strategies(draw):
    name = draw(st.sampled_from(STRATEGIES))
    pool = SETTINGS[name]
    chosen = draw(st.lists(st.sampled_from(sorted(pool)), max_size=2, unique=True))
    return name, {k: draw(pool[k]) for k in chosen}


BUDGETS = mostly(st.integers(1, 48),
                 st.sampled_from([0, NAN, -2, 10 ** 12, Budget(max_nfe=10 ** 12, max_seconds=0.2),
                                  Budget(max_nfe=40, max_seconds=0.05)]), 12)


def check_result(r, process: ImageProcess, budget, wall: float) -> None:
    c, h, w = process.sample_shape
    out, scores = r.outputs, r.scores
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape[1:] == (c, h, w)
    assert out.shape[0] >= 1 and bool(torch.isfinite(out).all()) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert scores.dtype == torch.float64 and scores.shape == (out.shape[0],)
    assert not bool(torch.isnan(scores).any()) and not bool((scores == math.inf).any())
    assert bool((scores[:-1] >= scores[1:]).all())
    b = Budget.coerce(budget)
    assert r.budget["nfe"] <= (b.max_nfe or math.inf)
    assert r.stopped is None or (r.stopped == "deadline" and b.max_seconds is not None)
    if b.max_seconds is not None:
        assert wall <= b.max_seconds + SLACK_SECONDS


def _huge_without_deadline(budget) -> bool:
    return isinstance(budget, int) and budget > HUGE


@given(proc=processes(), strategy=strategies(), budget=BUDGETS, seed=SEEDS)
@settings(max_examples=EXAMPLES * 2, suppress_health_check=[HealthCheck.too_slow])
def test_image_search_succeeds_with_its_invariants_or_raises_an_mmtts_error(proc, strategy, budget, seed):
    kw, (name, settings_) = proc, strategy
    if _huge_without_deadline(budget):
        budget = Budget(max_nfe=budget, max_seconds=0.2)  # a huge count alone would run for hours
    process = run_checked(lambda: ImageProcess(**kw))
    if process is None:
        return
    t0 = time.perf_counter()
    r = run_checked(lambda: mmtts.search(process, BRIGHTNESS, name, budget=budget, seed=seed, **settings_))
    wall = time.perf_counter() - t0
    if r is not None:
        check_result(r, process, budget, wall)
        assert kw["model"] not in (STUBS["wrong_shape"], STUBS["integer"], STUBS["not_a_tensor"], STUBS["raises"])


@given(model_dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
       latent_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       strategy=st.sampled_from(STRATEGIES), steps=st.integers(3, 4), seed=st.integers(0, 2 ** 32))
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
def test_other_float_precisions_are_converted_not_refused(model_dtype, latent_dtype, strategy, steps, seed):
    """Latents in any float precision reach a model of any float precision: the search runs, and the same seed
    gives the same result."""
    process = ImageProcess(unet(model_dtype), schedule("ddpm", steps), (1, 8, 8), dtype=latent_dtype)
    budget = 8 * steps

    def once():
        return mmtts.search(process, BRIGHTNESS, strategy, budget=budget, seed=seed)

    a, b = run_checked(once), run_checked(once)
    assert a is not None, "an unambiguous conversion was refused"
    check_result(a, process, budget, 0.0)
    assert torch.equal(a.outputs, b.outputs) and torch.equal(a.scores, b.scores)


@given(cond=st.one_of(st.integers(0, 9), st.just(torch.randn(3, 4)), st.just(torch.randn(3, 4).double()),
                      st.just(torch.randn(3, 4).half())),
       strategy=st.sampled_from(STRATEGIES), seed=st.integers(0, 2 ** 32))
@settings(max_examples=EXAMPLES // 2, suppress_health_check=[HealthCheck.too_slow])
def test_embeddings_take_the_model_dtype(cond, strategy, seed):
    seen = []

    def denoiser(x, t, c):
        seen.append(None if c is None else c.dtype)
        return torch.zeros_like(x)

    model = torch.nn.Module()  # a module with float64 weights, called through a function
    model.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    model.forward = denoiser
    r = run_checked(lambda: mmtts.search(ImageProcess(model, schedule("ddpm", 3), (2, 4, 4), cond=cond),
                                         BRIGHTNESS, strategy, budget=24, seed=seed))
    assert r is not None
    want = torch.int64 if isinstance(cond, int) else torch.float64
    assert seen and all(d == want for d in seen)


@given(shape=st.sampled_from([(8, 8, 1), (3, 8, 8), (2, 8, 8)]), model_dtype=st.sampled_from([torch.float32]))
@settings(max_examples=6, derandomize=True)
def test_a_wrong_channel_count_is_refused_naming_sample_shape(shape, model_dtype):
    try:
        ImageProcess(unet(model_dtype), schedule("ddim", 2), shape)
    except MmttsError as e:
        msg = str(e)
        assert "sample_shape" in msg and "reads 1" in msg
        assert ("(height, width, channels)" in msg) == (shape[-1] == 1)
    else:
        raise AssertionError(f"sample_shape {shape} was accepted for a 1-channel model")
