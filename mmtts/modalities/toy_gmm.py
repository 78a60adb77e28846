"""An analytic diffusion over a Gaussian mixture, for validating strategies against closed forms.

Data: x0 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dimensions. Noising is the
variance-preserving process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with a
cosine schedule and abar = 0 at the first stage, so sampling starts from an
exact N(0, I). Because the data are a mixture of Gaussians, everything a
diffusion model would learn is available in closed form: the score, the
denoiser E[x0 | x_t] (the preview), and even the exact reverse transition
p(x_s | x_t), itself a Gaussian mixture.

Two samplers:
- ``exact``: ancestral sampling with the exact reverse transition, so final
  samples follow the data distribution exactly for any number of stages;
- ``ddim``: the DDIM update with the exact denoiser and stochasticity ``eta``
  (eta = 1 is DDPM's ancestral step), which is what a trained model would run.

A quadratic reward r(x) = -|x - c|^2 / (2 w^2) keeps the tilted target
p(x) exp(lmbda r(x)) a Gaussian mixture too (:meth:`GaussianMixture.tilt`), and
the reward's distribution under p is a mixture of scaled non-central
chi-squares, which gives the order statistics of best-of-N in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import integrate, stats

from ..core.process import Process
from ..core.registry import VERIFIERS
from ..core.rng import Streams
from ..core.state import State
from ..core.verifier import Verifier


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture.

    Attributes:
        weights: (K,) mixture weights.
        means: (K, D) component means.
        stds: (K,) component standard deviations.
    """

    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64)
        if (w <= 0).any() or abs(w.sum() - 1.0) > 1e-9:
            raise ValueError(f"mixture weights {self.weights} must be positive and sum to 1")
        m = np.asarray(self.means, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != len(w) or len(self.stds) != len(w):
            raise ValueError("means must be (K, D) and stds (K,) with K the number of weights")
        if min(self.stds) <= 0:
            raise ValueError(f"stds {self.stds} must be positive")

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def tensors(self, device="cpu"):
        f = torch.float64
        return (torch.tensor(self.weights, dtype=f, device=device), torch.tensor(self.means, dtype=f, device=device),
                torch.tensor(self.stds, dtype=f, device=device))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x of shape (B, D)."""
        pi, mu, s = self.tensors(x.device)
        return _mixture_log_prob(x.to(torch.float64), torch.log(pi), mu, s ** 2)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        pi, mu, s = self.tensors()
        k = torch.multinomial(pi, n, replacement=True, generator=generator)
        return mu[k] + s[k, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most responsible component of each point."""
        pi, mu, s = self.tensors(x.device)
        return _component_log_joint(x.to(torch.float64), torch.log(pi), mu, s ** 2).argmax(1)

    def tilt(self, center, width: float, lmbda: float) -> "GaussianMixture":
        """The mixture proportional to p(x) exp(lmbda * r(x)), r(x) = -|x - c|^2 / (2 width^2)."""
        pi, mu, s = self.tensors()
        c = torch.as_tensor(center, dtype=torch.float64)
        prec_r = lmbda / width ** 2  # precision of the reward's Gaussian factor
        var_k = s ** 2
        log_w = torch.log(pi) - 0.5 * self.dim * torch.log(var_k + 1 / prec_r) \
            - ((mu - c) ** 2).sum(1) / (2 * (var_k + 1 / prec_r))
        w = torch.softmax(log_w, 0)
        new_var = 1.0 / (1.0 / var_k + prec_r)
        new_mu = new_var[:, None] * (mu / var_k[:, None] + prec_r * c)
        return GaussianMixture(tuple(w.tolist()), tuple(map(tuple, new_mu.tolist())), tuple(new_var.sqrt().tolist()))


def _component_log_joint(x, log_pi, mu, var):
    """log pi_k + log N(x; mu_k, var_k I), shape (B, K)."""
    d = x.shape[1]
    sq = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
    return log_pi[None] - 0.5 * d * torch.log(2 * math.pi * var)[None] - sq / (2 * var[None])


def _mixture_log_prob(x, log_pi, mu, var):
    return torch.logsumexp(_component_log_joint(x, log_pi, mu, var), dim=1)


def cosine_abar(num_stages: int) -> torch.Tensor:
    """abar at the T + 1 grid points, from pure noise (0) to data (1)."""
    u = torch.linspace(1.0, 0.0, num_stages + 1, dtype=torch.float64)
    abar = torch.cos(0.5 * math.pi * u) ** 2
    abar[0], abar[-1] = 0.0, 1.0
    return abar


class GMMDiffusion(Process):
    """The staged sampler of the mixture; one stage is one denoising step (1 NFE).

    Args:
        mixture: the :class:`GaussianMixture` the data come from.
        num_stages: number of denoising steps (at least 1).
        sampler: ``"exact"`` (closed-form posterior) or ``"ddim"``.
        eta: DDIM noise level, 0 deterministic, 1 ancestral.
        denoiser: optional ``denoiser(x, abar) -> x0_hat`` replacing the exact E[x0 | x_t]; ddim only.
    """

    SAMPLERS = ("exact", "ddim")

    def __init__(self, mixture: GaussianMixture, num_stages: int = 20, sampler: str = "exact", eta: float = 1.0,
                 denoiser=None):
        """``denoiser(x, abar) -> x0_hat`` replaces the exact E[x0 | x_t] (a trained model); ddim only."""
        if denoiser is not None and sampler != "ddim":
            raise ValueError("a learned denoiser needs sampler='ddim' (the exact sampler uses the closed form)")
        if sampler not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {self.SAMPLERS}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be at least 1, got {num_stages}")
        self.mixture = mixture
        self.num_stages = int(num_stages)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta={eta!r} must be a finite number >= 0 (0: deterministic DDIM, 1: ancestral)")
        self.sampler = sampler
        self.eta = float(eta)
        self.abar = cosine_abar(self.num_stages)
        self.pi, self.mu, self.s = mixture.tensors()
        self.denoiser = denoiser

    # -- closed forms ---------------------------------------------------------------
    def _marginal(self, abar):
        """Per-component mean scale a and variance v of x at abar: x | k ~ N(a mu_k, v_k I). Shapes (B,1), (B,K)."""
        a = abar.sqrt()[:, None]
        v = a ** 2 * self.s[None] ** 2 + (1 - abar)[:, None]
        return a, v

    def responsibilities(self, x, abar):
        a, v = self._marginal(abar)
        d = x.shape[1]
        sq = ((x[:, None, :] - a[:, :, None] * self.mu[None]) ** 2).sum(-1)
        logj = torch.log(self.pi)[None] - 0.5 * d * torch.log(v) - sq / (2 * v)
        return torch.softmax(logj, 1)

    def denoise(self, x, abar):
        """E[x0 | x_t] for x of shape (B, D) at per-candidate abar (B,), or the learned denoiser's estimate."""
        if self.denoiser is not None:
            with torch.no_grad():
                return self.denoiser(x, abar).to(torch.float64)
        a, v = self._marginal(abar)
        gain = a * self.s[None] ** 2 / v                                   # (B, K)
        cond = self.mu[None] + gain[:, :, None] * (x[:, None, :] - a[:, :, None] * self.mu[None])
        return (self.responsibilities(x, abar)[:, :, None] * cond).sum(1)

    def ancestral_sigma(self, stage: torch.Tensor) -> torch.Tensor:
        """Std of the DDPM posterior q(x_s | x_t, x0) at ``stage`` (the eta = 1 step's noise)."""
        at, as_ = self.abar[stage], self.abar[(stage + 1).clamp(max=self.num_stages)]
        ratio = torch.where(as_ > 0, at / as_.clamp(min=1e-300), torch.zeros_like(at))
        var = (1 - as_) / (1 - at).clamp(min=1e-300) * (1 - ratio)
        return var.clamp(min=0).sqrt()

    def step_sigma(self, stage: torch.Tensor) -> torch.Tensor:
        """Std of the fresh noise the sampler adds at ``stage``."""
        return self.eta * self.ancestral_sigma(stage)

    # -- Process -----------------------------------------------------------------------
    def is_stochastic(self, stage: int) -> bool:
        """The exact sampler always draws; DDIM draws where eta * sigma_t > 0 (never at eta = 0, nor at the
        last step, whose posterior std is 0)."""
        if self.sampler == "exact":
            return True
        return bool(self.step_sigma(torch.tensor([int(stage)]))[0] > 0)

    def init(self, streams: Streams, first_index: int = 0) -> State:
        x = streams.randn((self.mixture.dim,), dtype=torch.float64)
        return State.fresh({"x": x}, streams, first_index)

    def step(self, state: State) -> State:
        x, t = state.data["x"], state.stage
        at, as_ = self.abar[t], self.abar[t + 1]
        if self.sampler == "exact":
            new = self._exact_step(x, at, as_, state.streams)
        else:
            x0 = self.denoise(x, at)
            bt = (1 - at).sqrt()[:, None]
            eps = torch.where(bt > 0, (x - at.sqrt()[:, None] * x0) / bt.clamp(min=1e-300), torch.zeros_like(x))
            sigma = self.step_sigma(t)[:, None]
            z = state.streams.randn((self.mixture.dim,), dtype=torch.float64)
            dir_coef = ((1 - as_)[:, None] - sigma ** 2).clamp(min=0).sqrt()
            new = as_.sqrt()[:, None] * x0 + dir_coef * eps + sigma * z
        out = state.replace(x=new)
        out.stage = state.stage + 1
        return out

    def _exact_step(self, x, at, as_, streams: Streams):
        """Draw x_s ~ p(x_s | x_t): pick a component by its posterior, then the Gaussian posterior."""
        resp = self.responsibilities(x, at)                                  # (B, K)
        u = streams.rand()                                                   # (B,)
        k = torch.searchsorted(resp.cumsum(1), u[:, None]).clamp(max=len(self.pi) - 1)[:, 0]
        a_s, v_s = self._marginal(as_)
        m_s = a_s * self.mu[k]                                               # (B, D)
        v_s = v_s.gather(1, k[:, None])                                      # (B, 1)
        alpha2 = torch.where(as_ > 0, at / as_.clamp(min=1e-300), torch.zeros_like(at))[:, None]
        beta2 = 1 - alpha2
        prec = 1 / v_s + alpha2 / beta2
        mean = (m_s / v_s + alpha2.sqrt() * x / beta2) / prec
        z = streams.randn((self.mixture.dim,), dtype=torch.float64)
        return mean + prec.rsqrt() * z

    def preview(self, state: State) -> torch.Tensor:
        return self.denoise(state.data["x"], self.abar[state.stage])

    def finish(self, state: State) -> torch.Tensor:
        return state.data["x"].clone()

    def perturb(self, state: State, scale: float | torch.Tensor) -> State:
        """Mutate candidates before their next step.

        At stage 0 the initial noise is mixed, sqrt(1 - b^2) x + b eps with b = scale, which
        keeps it standard normal; later, x + scale * sigma_t * eps with sigma_t the std of the
        ancestral (eta = 1) step at that stage, so deterministic samplers can be mutated too.
        """
        x = state.data["x"]
        z = state.streams.randn((self.mixture.dim,), dtype=torch.float64)
        b = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1)  # one scale, or one per candidate
        sigma = self.ancestral_sigma(state.stage.clamp(max=self.num_stages - 1))[:, None]
        start = (state.stage == 0)[:, None]
        return state.replace(x=torch.where(start, (1 - b ** 2).clamp(min=0).sqrt() * x + b * z, x + b * sigma * z))

    def renoise(self, state: State, stages: int) -> State:
        """The forward transition x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) eps."""
        s = state.stage
        t = (s - stages).clamp(min=0)
        as_, at = self.abar[s], self.abar[t]
        ratio = torch.where(as_ > 0, at / as_.clamp(min=1e-300), torch.zeros_like(at))[:, None]
        z = state.streams.randn((self.mixture.dim,), dtype=torch.float64)
        out = state.replace(x=ratio.sqrt() * state.data["x"] + (1 - ratio).sqrt() * z)
        out.stage = t
        return out

    def describe(self) -> dict:
        return {**super().describe(), "sampler": self.sampler, "eta": self.eta}


@VERIFIERS.register("toy-quadratic")
class QuadraticReward(Verifier):
    """r(x) = -|x - c|^2 / (2 width^2): higher is closer to the target point c.

    Args:
        center: the target point c.
        width: the length scale of the reward.
        name: the verifier's name.
    """

    def __init__(self, center, width: float = 1.0, name: str = "quadratic"):
        super().__init__()
        self.center = torch.as_tensor(center, dtype=torch.float64)
        self.width = float(width)
        self.name = name

    def score(self, outputs, context=None):
        return -((outputs.to(torch.float64) - self.center) ** 2).sum(1) / (2 * self.width ** 2)

    def cdf(self, mixture: GaussianMixture, r: np.ndarray) -> np.ndarray:
        """P(r(X) <= r) for X ~ mixture: each component gives a scaled non-central chi-square distance."""
        r = np.asarray(r, dtype=np.float64)
        d2 = -2.0 * self.width ** 2 * r
        out = np.zeros_like(d2)
        c = self.center.numpy()
        for w, m, s in zip(mixture.weights, mixture.means, mixture.stds):
            nc = float(((np.asarray(m) - c) ** 2).sum() / s ** 2)
            out += w * stats.ncx2.sf(np.maximum(d2, 0) / s ** 2, df=mixture.dim, nc=nc)
        return np.where(r >= 0, 1.0, out)

    def expected_best_of(self, mixture: GaussianMixture, n: int) -> float:
        """E[max of n i.i.d. rewards] = -integral_0^inf F(-y)^n dy (rewards are <= 0)."""
        val, _ = integrate.quad(lambda y: float(self.cdf(mixture, np.array(-y))) ** n, 0, np.inf, limit=200)
        return -val

    def expected_under(self, mixture: GaussianMixture) -> float:
        """E[r(X)] for X ~ mixture (closed form)."""
        c = self.center.numpy()
        tot = 0.0
        for w, m, s in zip(mixture.weights, mixture.means, mixture.stds):
            tot += w * (((np.asarray(m) - c) ** 2).sum() + mixture.dim * s ** 2)
        return -tot / (2 * self.width ** 2)


@VERIFIERS.register("toy-log-density")
class MixtureLogDensity(Verifier):
    """log p(x) under the data mixture: a held-out check that search stays on the data distribution.

    Args:
        mixture: the :class:`GaussianMixture` whose density is evaluated.
        name: the verifier's name.
    """

    def __init__(self, mixture: GaussianMixture, name: str = "log_density"):
        super().__init__()
        self.mixture = mixture
        self.name = name

    def score(self, outputs, context=None):
        return self.mixture.log_prob(outputs)


DEFAULT_MIXTURE = GaussianMixture(
    weights=(0.4, 0.3, 0.2, 0.1),
    means=((-2.0, -2.0), (-2.0, 2.0), (2.0, -2.0), (2.0, 2.0)),
    stds=(0.5, 0.5, 0.5, 0.5),
)
DEFAULT_TARGET = (2.0, 1.0)
