"""ImageProcess: a diffusers denoiser, scheduler and optional VAE as a searchable staged Process.

The process runs its own denoising loop rather than a stock pipeline's,
because search needs what pipeline callbacks cannot give: changing the batch
between steps, re-noising forward, the x0 prediction of every candidate, and
each candidate's noise from its own stream. One stage is one denoising step;
with classifier-free guidance it costs two model forwards per candidate, which
is what the budget counts.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import torch
from torch import nn

from ...core.errors import MmttsError
from ...core.settings import real, whole
from ...core.process import Process
from ...core.rng import Streams
from ...core.state import State
from ...kernels import denoise_step
from .schedulers import Schedule, schedule_from_scheduler


def denoiser_call(model) -> Callable:
    """A uniform ``fn(x, t, cond) -> prediction`` for the diffusers model classes search supports.

    ``cond`` is a (B,) tensor of class labels, a (B, L, D) tensor of text
    embeddings, or None. Models with a learned variance (DiT) return twice the
    input channels; the variance half is dropped.
    """
    kind = type(model).__name__
    in_ch = getattr(getattr(model, "config", None), "in_channels", None)

    def trim(out, x):
        out = out.sample if hasattr(out, "sample") else out
        if in_ch is not None and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    if kind == "UNet2DModel":
        return lambda x, t, c: trim(model(x, t, class_labels=c), x)
    if kind == "UNet2DConditionModel":
        return lambda x, t, c: trim(model(x, t, encoder_hidden_states=c), x)
    if kind in ("DiTTransformer2DModel", "Transformer2DModel"):
        return lambda x, t, c: trim(model(x, timestep=t, class_labels=c), x)
    if callable(model):
        return lambda x, t, c: trim(model(x, t, c), x)
    raise MmttsError(f"cannot call a {kind} as a denoiser; pass a UNet2DModel, UNet2DConditionModel, "
                     "DiT transformer, or a function fn(x, t, cond)")


class ImageProcess(Process):
    """Search over the denoising trajectory of an image (or latent) diffusion model.

    What verifiers receive per candidate (:meth:`context`) is ``{"label": cond}``
    for class conditioning and ``{"prompt": prompt}`` when a prompt is given.

    Args:
        model: the denoiser (diffusers model or ``fn(x, t, cond)``).
        schedule: a :class:`Schedule` (see ``schedule_from_scheduler``).
        sample_shape: (C, H, W) of one latent.
        cond: conditioning of every candidate: a class label (int) or a (L, D) text embedding, or None.
        uncond: the unconditional input for guidance: the null class label or a (L, D) empty-prompt embedding.
        guidance_scale: classifier-free guidance weight; != 1 needs ``uncond`` and costs 2 forwards per step.
        vae: decodes latents. Without it outputs are the pixels.
        vae_scale: the latents' scaling factor; defaults to the VAE's ``config.scaling_factor`` (1 without a VAE).
        prompt: the text prompt passed to verifiers in the context.
        device: where latents are drawn and the model runs.
        dtype: dtype of the latents.
        output_range: (low, high) of the decoded images, mapped to [0, 1].
    """

    latent_key = "x"
    #: the dimensions of ``sample_shape``, channels first
    sample_layout: tuple[str, ...] = ("channels", "height", "width")

    def __init__(self, model, schedule: Schedule, sample_shape, *, cond=None, uncond=None,
                 guidance_scale: float = 1.0, vae=None, vae_scale: float | None = None, prompt: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, output_range=(-1.0, 1.0)):
        self.model = model
        self.call = denoiser_call(model)
        if not isinstance(schedule, Schedule):
            raise MmttsError(f"schedule must be a Schedule (e.g. schedule_from_scheduler(DDIMScheduler(...), steps)), "
                             f"not {type(schedule).__name__}")
        self.schedule = schedule
        self.num_stages = schedule.num_stages
        self.model_dtype = _floating_dtype(model)
        self.sample_shape = _check_sample_shape(sample_shape, model, self.sample_layout, type(self).__name__)
        self.device = _check_device(device)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise MmttsError(f"dtype={dtype!r} must be a floating torch dtype (torch.float32, float64, float16 or "
                             "bfloat16) for the latents")
        self.dtype = dtype
        self.cond = self._as_cond(cond, "cond")
        self.uncond = self._as_cond(uncond, "uncond")
        self.guidance_scale = real("guidance_scale", guidance_scale, "ImageProcess")
        self.guided = self.guidance_scale != 1.0 and self.uncond is not None
        if self.guidance_scale != 1.0 and self.uncond is None:
            raise MmttsError("guidance_scale != 1 needs uncond (the null class label or the empty-prompt embedding)")
        self.nfe_per_stage = 2 if self.guided else 1
        self.vae = vae
        self.vae_scale = real("vae_scale", vae_scale, "ImageProcess", low=0.0, low_open=True) \
            if vae_scale is not None else (
            getattr(getattr(vae, "config", None), "scaling_factor", 1.0) if vae is not None else 1.0)
        self.decodes_on_preview = self.decodes_on_finish = vae is not None
        self.prompt = prompt
        self.output_range = _check_range(output_range)

    # -- construction from a pipeline --------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, *, num_inference_steps: int = 50, update: str | None = None,
                      eta: float | None = None, scheduler=None, class_label: int | None = None,
                      prompt: str | None = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
                      null_class: int | None = None, device=None, dtype=None) -> "ImageProcess":
        """Search with an existing DiffusionPipeline's components (unet/transformer, scheduler, vae, text encoder).

        ``scheduler`` replaces the pipeline's (e.g. ``DDIMScheduler.from_config(pipe.scheduler.config)``);
        multistep solvers are not stepwise-searchable and must be replaced this way.
        """
        model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if model is None:
            raise MmttsError(f"{type(pipe).__name__} has neither a unet nor a transformer to search with")
        sched = scheduler or pipe.scheduler
        schedule = schedule_from_scheduler(sched, num_inference_steps, update=update, eta=eta)
        vae = getattr(pipe, "vae", None)
        cfg = model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        ds = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        h = (height // ds) if height else size
        w = (width // ds) if width else size
        shape = (cfg.in_channels, h, w)
        device = device or getattr(pipe, "device", "cpu")
        dtype = dtype or getattr(model, "dtype", torch.float32)
        cond = uncond = None
        if prompt is not None or prompt_embeds is not None:
            cond = prompt_embeds[0] if prompt_embeds is not None else cls._encode(pipe, prompt)
            if guidance_scale != 1.0:
                uncond = negative_prompt_embeds[0] if negative_prompt_embeds is not None else cls._encode(pipe, "")
        elif class_label is not None:
            cond = int(class_label)
            if guidance_scale != 1.0:
                n = null_class if null_class is not None else cls._null_class(model)
                uncond = n
        return cls(model, schedule, shape, cond=cond, uncond=uncond, guidance_scale=guidance_scale, vae=vae,
                   prompt=prompt, device=device, dtype=dtype)

    @staticmethod
    def _null_class(model) -> int:
        cfg = model.config
        for key in ("num_embeds_ada_norm", "num_class_embeds"):
            n = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
            if n:
                return int(n) - (1 if key == "num_class_embeds" else 0)
        raise MmttsError("cannot tell the model's null class for guidance; pass null_class=")

    @staticmethod
    def _encode(pipe, prompt: str) -> torch.Tensor:
        tok, enc = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        if tok is None or enc is None:
            raise MmttsError("the pipeline has no tokenizer/text encoder; pass prompt_embeds= instead of prompt=")
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        with torch.no_grad():
            return enc(ids)[0][0]

    def _as_cond(self, c, name: str):
        """A class label (int) or an embedding tensor on the process's device; floating embeddings take the
        model's dtype (the conversion the model needs anyway)."""
        if c is None:
            return None
        if isinstance(c, numbers.Integral) and not isinstance(c, bool):
            return torch.tensor(int(c), dtype=torch.int64, device=self.device)
        if type(c).__module__ == "numpy" and hasattr(c, "dtype"):
            c = torch.as_tensor(c)
        if not isinstance(c, torch.Tensor) or c.dtype == torch.bool or c.is_complex():
            got = f"a {c.dtype} tensor" if isinstance(c, torch.Tensor) else type(c).__name__
            raise MmttsError(f"{name} must be a class label (int), a (L, D) text-embedding tensor or None; got {got}")
        if c.is_floating_point():
            if not bool(torch.isfinite(c).all()):
                raise MmttsError(f"{name} holds NaN or inf; pass a finite embedding")
            c = c.to(self.model_dtype or c.dtype)
        return c.to(self.device)

    # -- Process -------------------------------------------------------------------------
    def init(self, streams: Streams, first_index: int = 0) -> State:
        x = streams.randn(self.sample_shape, device=self.device, dtype=self.dtype)
        return State.fresh({"x": x, "x0": torch.zeros_like(x)}, streams, first_index)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """The (guided) model output for latents at per-candidate stages, in the latents' dtype.

        The model receives the latents in its own floating dtype when they
        differ (float64 latents for a float32 model, say), and its output is
        cast back.
        """
        t = self.schedule.timesteps[stage].to(self.device)
        b = x.shape[0]
        xin = x if self.model_dtype is None or x.dtype == self.model_dtype else x.to(self.model_dtype)
        cond = None if self.cond is None else self.cond.expand(b, *self.cond.shape)
        try:
            if self.guided:
                unc = self.uncond.expand(b, *self.uncond.shape)
                both = torch.cat([cond, unc]) if cond is not None else None
                out = self.call(torch.cat([xin, xin]), torch.cat([t, t]), both)
                oc, ou = self._checked(out, (2 * b,) + tuple(x.shape[1:])).chunk(2)
                out = ou + self.guidance_scale * (oc - ou)
            else:
                out = self._checked(self.call(xin, t, cond), tuple(x.shape))
        except MmttsError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise MmttsError(
                f"the denoiser failed on latents of shape {tuple(xin.shape)} ({xin.dtype}) with "
                f"cond={'None' if cond is None else tuple(cond.shape)}: {type(e).__name__}: {e}. Check sample_shape "
                "(channels, height, width) and cond against the model") from e
        out = out.to(x.dtype)
        bad = ~torch.isfinite(out.reshape(b, -1)).all(1)
        if bool(bad.any()):
            where = [(int(i), int(stage[i]), int(self.schedule.timesteps[stage[i]])) for i in bad.nonzero()[:, 0]]
            raise MmttsError(
                f"the model returned NaN/inf at denoising step {where[0][1]} (timestep {where[0][2]}) for "
                f"{len(where)} candidate(s) (first: candidate {where[0][0]}); check the model's dtype "
                "(fp16 overflow) and inputs"
            )
        return out

    @staticmethod
    def _checked(out, shape: tuple) -> torch.Tensor:
        """The model's output when it is a floating tensor of the latents' shape."""
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != shape:
            got = f"{out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) \
                else type(out).__name__
            raise MmttsError(f"the denoiser returned a {got} for latents of shape {shape}; it must return a "
                             "floating prediction of the latents' shape (noise, x0 or v)")
        return out

    def step(self, state: State) -> State:
        """One denoising step of every candidate: :func:`mmtts.kernels.denoise_step` on its stage's coefficients.

        The fresh noise (stochastic schedules) is each candidate's next draw
        from its stream, made on the latents' device.
        """
        x, stage = state.data["x"], state.stage
        out = self.predict(x, stage)
        noise = state.streams.randn(self.sample_shape, device=x.device) if self.schedule.stochastic else None
        nxt, x0 = denoise_step(x, out, self.schedule.step_coefficients(stage), z=noise)
        new = state.replace(x=nxt, x0=x0)
        new.stage = stage + 1
        return new

    def preview(self, state: State) -> torch.Tensor:
        """x0-hat of each candidate from its last step, decoded (no extra model forward)."""
        if bool((state.stage == 0).any()):
            raise MmttsError("no x0 preview before a candidate's first denoising step")
        return self.decode(state.data["x0"])

    def finish(self, state: State) -> torch.Tensor:
        return self.decode(state.data["x"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1] (B, C, H, W) on the CPU, float32."""
        return decode_latents(latents, self.vae, self.vae_scale, self.output_range)

    def context(self, state: State) -> Any:
        n = len(state)
        ctx = {}
        if self.cond is not None and self.cond.ndim == 0:
            ctx["label"] = self.cond.expand(n).cpu()
        if self.prompt is not None:
            ctx["prompt"] = [self.prompt] * n
        return ctx or None

    def is_stochastic(self, stage: int) -> bool:
        """Whether the step from ``stage`` adds fresh noise: the schedule's noise std there is > 0 (never for
        DDIM with eta = 0, nor at DDIM's last step at any eta)."""
        return bool(self.schedule.noise_std(torch.tensor([int(stage)]))[0] > 0)

    def perturb(self, state: State, scale: float | torch.Tensor) -> State:
        """x + scale * sigma_t * eps with sigma_t the stochastic std of the next step (DDPM's when deterministic).

        At stage 0 the initial noise is mixed instead, sqrt(1 - b^2) x + b eps with b = scale,
        which keeps it standard normal. ``scale`` is a float or one per candidate; computed in float32
        (float64 for float64 latents).
        """
        x = state.data["x"]
        z = state.streams.randn(self.sample_shape, device=x.device)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (x.ndim - 1)
        b = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(len(state))
        start = state.stage == 0
        # per candidate: the noise's weight, and x's where the initial noise is mixed; one multiply-add over x
        mult = b * torch.where(start, 1.0, self.mutation_std(state.stage.clamp(max=self.num_stages - 1)))
        xs = x.to(dtype)
        if bool(start.any()):
            xs = xs * torch.where(start, (1 - b * b).clamp(min=0).sqrt(), 1.0).to(x.device, dtype).view(shape)
        return state.replace(x=torch.addcmul(xs, mult.to(x.device, dtype).view(shape), z.to(dtype)).to(x.dtype))

    def mutation_std(self, stage: torch.Tensor) -> torch.Tensor:
        """sigma_t of :meth:`perturb` at ``stage`` (float64): the step's own noise std, or the posterior's."""
        s = self.schedule
        return s.noise_std(stage) if s.stochastic else s.posterior_std(stage)

    def renoise(self, state: State, stages: int) -> State:
        to = (state.stage - stages).clamp(min=0)
        z = state.streams.randn(self.sample_shape, device=state.data["x"].device)
        x = self.schedule.renoise(state.data["x"], state.stage, to, z)
        out = state.replace(x=x)
        out.stage = to
        return out

    def describe(self) -> dict:
        s = self.schedule
        return {**super().describe(), "update": s.update, "eta": s.eta, "prediction": s.prediction,
                "guidance_scale": self.guidance_scale, "latent": self.vae is not None}


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, vae_scale: float, output_range) -> torch.Tensor:
    """(N, C, H, W) latents to images in [0, 1] on the CPU, float32: through ``vae`` (in its own dtype) after
    dividing by ``vae_scale``, or the latents themselves without one; ``output_range`` is mapped to [0, 1]."""
    if vae is not None:
        z = latents / vae_scale
        vae_dtype = _floating_dtype(vae)
        try:
            img = vae.decode(z if vae_dtype is None else z.to(vae_dtype)).sample
        except (RuntimeError, ValueError, TypeError) as e:
            raise MmttsError(f"the VAE failed to decode latents of shape {tuple(latents.shape)}: {e}. Check "
                             "sample_shape against the VAE's latent channels and downsampling") from e
    else:
        img = latents
    lo, hi = output_range
    return ((img.float() - lo) / (hi - lo)).clamp(0, 1).cpu()


def _floating_dtype(model) -> torch.dtype | None:
    """The dtype of the first floating parameter of a module (None for a plain function or a module without any)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _in_channels(model) -> int | None:
    """The channels the denoiser reads: its config's ``in_channels``, or its first convolution's when that is a
    Conv2d (None when neither tells)."""
    n = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(n, int):
        return n
    if isinstance(model, nn.Module):
        first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if type(first) is nn.Conv2d:
            return first.in_channels
    return None


def _check_sample_shape(sample_shape, model, layout: tuple[str, ...] = ("channels", "height", "width"),
                        owner: str = "ImageProcess") -> tuple[int, ...]:
    """``layout`` (channels first) of positive whole numbers, the channels matching the model's input channels
    where it declares them."""
    try:
        dims = tuple(sample_shape)
    except TypeError:
        dims = None
    if dims is None or len(dims) != len(layout):
        raise MmttsError(f"sample_shape {sample_shape!r} must be ({', '.join(layout)}) of one latent")
    shape = tuple(whole(f"sample_shape[{i}]", d, owner) for i, d in enumerate(dims))
    want = _in_channels(model)
    if want is not None and shape[0] != want:
        hint = f"; did you pass (height, width, channels)? use {(shape[2], shape[0], shape[1])}" \
            if len(shape) == 3 and shape[2] == want else ""
        raise MmttsError(f"sample_shape {shape} has {shape[0]} channels; the model reads {want}: pass "
                         f"({want}, {', '.join(layout[1:])}){hint}")
    return shape


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MmttsError(f"device={device!r} is not a torch device (e.g. 'cpu' or 'cuda'): {e}") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MmttsError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "pass device='cpu' or an existing GPU")
    return dev


def _check_range(output_range) -> tuple[float, float]:
    try:
        lo, hi = output_range
    except (TypeError, ValueError):
        raise MmttsError(f"output_range={output_range!r} must be (low, high), e.g. (-1.0, 1.0)") from None
    lo, hi = real("output_range[0]", lo, "ImageProcess"), real("output_range[1]", hi, "ImageProcess")
    if not hi > lo:
        raise MmttsError(f"output_range={output_range!r} needs low < high")
    return lo, hi
