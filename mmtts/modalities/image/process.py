"""ImageProcess: a diffusers denoiser, scheduler and optional VAE as a searchable staged Process.

The process runs its own denoising loop rather than a stock pipeline's,
because search needs what pipeline callbacks cannot give: changing the batch
between steps, re-noising forward, the x0 prediction of every candidate, and
each candidate's noise from its own stream. One stage is one denoising step;
with classifier-free guidance it costs two model forwards per candidate, which
is what the budget counts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...core.errors import MmttsError
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

    def __init__(self, model, schedule: Schedule, sample_shape, *, cond=None, uncond=None,
                 guidance_scale: float = 1.0, vae=None, vae_scale: float | None = None, prompt: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, output_range=(-1.0, 1.0)):
        self.model = model
        self.call = denoiser_call(model)
        self.schedule = schedule
        self.num_stages = schedule.num_stages
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if len(self.sample_shape) != 3:
            raise MmttsError(f"sample_shape {sample_shape} must be (channels, height, width)")
        self.device = torch.device(device)
        self.dtype = dtype
        self.cond = self._as_cond(cond)
        self.uncond = self._as_cond(uncond)
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale != 1.0 and self.uncond is not None
        if self.guidance_scale != 1.0 and self.uncond is None:
            raise MmttsError("guidance_scale != 1 needs uncond (the null class label or the empty-prompt embedding)")
        self.nfe_per_stage = 2 if self.guided else 1
        self.vae = vae
        self.vae_scale = vae_scale if vae_scale is not None else (
            getattr(getattr(vae, "config", None), "scaling_factor", 1.0) if vae is not None else 1.0)
        self.decodes_on_preview = self.decodes_on_finish = vae is not None
        self.prompt = prompt
        self.output_range = output_range

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

    def _as_cond(self, c):
        if c is None:
            return None
        if isinstance(c, int):
            return torch.tensor(c, dtype=torch.int64, device=self.device)
        return torch.as_tensor(c).to(self.device)

    # -- Process -------------------------------------------------------------------------
    def init(self, streams: Streams, first_index: int = 0) -> State:
        x = streams.randn(self.sample_shape, device=self.device, dtype=self.dtype)
        return State.fresh({"x": x, "x0": torch.zeros_like(x)}, streams, first_index)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """The (guided) model output for latents at per-candidate stages."""
        t = self.schedule.timesteps[stage].to(self.device)
        b = x.shape[0]
        cond = None if self.cond is None else self.cond.expand(b, *self.cond.shape)
        if self.guided:
            unc = self.uncond.expand(b, *self.uncond.shape)
            out = self.call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, unc]) if cond is not None else None)
            oc, ou = out.chunk(2)
            out = ou + self.guidance_scale * (oc - ou)
        else:
            out = self.call(x, t, cond)
        bad = ~torch.isfinite(out.reshape(b, -1)).all(1)
        if bool(bad.any()):
            where = [(int(i), int(stage[i]), int(self.schedule.timesteps[stage[i]])) for i in bad.nonzero()[:, 0]]
            raise MmttsError(
                f"the model returned NaN/inf at denoising step {where[0][1]} (timestep {where[0][2]}) for "
                f"{len(where)} candidate(s) (first: candidate {where[0][0]}); check the model's dtype "
                "(fp16 overflow) and inputs"
            )
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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1] (B, C, H, W) on the CPU, float32."""
        if self.vae is not None:
            img = self.vae.decode(latents / self.vae_scale).sample
        else:
            img = latents
        lo, hi = self.output_range
        return ((img.float() - lo) / (hi - lo)).clamp(0, 1).cpu()

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
