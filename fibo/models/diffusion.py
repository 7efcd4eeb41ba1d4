"""Diffusion-policy action head (Chi et al., "Diffusion Policy", RSS 2023): a 1-D temporal conv U-Net
that predicts the noise added to a normalised action chunk, conditioned (FiLM) on the diffusion step
and on the observation features, with diffusers' schedulers for training and sampling.

* :class:`ConditionalUnet1D`: input ``(B, T, A)`` noisy chunk, ``(B,)`` step, ``(B, C)`` condition
  -> ``(B, T, A)`` predicted noise. Down path of residual blocks with stride-2 convs, two middle
  blocks, up path with transposed convs and skip connections; every residual block modulates its
  features with a per-channel scale and bias predicted from the condition (FiLM, Perez et al. 2018).
  The step embedding is diffusers' sinusoidal ``Timesteps`` + ``TimestepEmbedding`` (Mish).
  ``T`` must be divisible by ``2 ** (len(down_dims) - 1)``.
* :class:`DiffusionHead`: the U-Net plus a ``DDPMScheduler`` (training: ``add_noise`` at uniform
  random steps, loss on the noise) and a ``DDIMScheduler`` built from the same config (inference:
  ``num_inference_steps`` deterministic steps from Gaussian noise).

Written for fibo after the architecture described in the paper and its reference code
(github.com/real-stanford/diffusion_policy, ``ConditionalUnet1D``); small widths by default for CPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int, n_groups: int) -> int:
    """The largest group count <= ``n_groups`` that divides ``channels`` (GroupNorm needs one)."""
    g = min(n_groups, channels)
    while channels % g:
        g -= 1
    return g


def check_horizon(horizon: int, down_dims: Sequence[int]) -> int:
    """``horizon`` (actions per prediction) is a multiple of ``2 ** (len(down_dims) - 1)``: the U-Net
    halves the chunk once per level below the first and must restore it exactly.

    Raises:
        ValueError: otherwise, naming the nearest horizons that fit.
    """
    levels = len(down_dims)
    multiple = 2 ** (levels - 1)
    if horizon % multiple:
        below, above = horizon // multiple * multiple, (horizon // multiple + 1) * multiple
        fits = f"{below} or {above}" if below else f"{above}"
        raise ValueError(f"the diffusion horizon, {horizon} actions per prediction (data.seq_length, by default "
                         f"model.head.horizon), is not a multiple of {multiple} (the U-Net halves it {levels - 1} "
                         f"times: model.head.down_dims has {levels} levels): set model.head.horizon={fits} or use "
                         f"fewer model.head.down_dims")
    return horizon


class Conv1dBlock(nn.Sequential):
    """Conv1d (same padding) -> GroupNorm -> Mish; ``(B, C_in, T)`` -> ``(B, C_out, T)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8) -> None:
        super().__init__(nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(_groups(out_channels, n_groups), out_channels), nn.Mish())


class FiLMResidualBlock1D(nn.Module):
    """Two :class:`Conv1dBlock` with FiLM between them: ``h = scale(c) * conv1(x) + bias(c)``, then
    ``conv2(h) + residual(x)``. ``x``: ``(B, C_in, T)``, ``cond``: ``(B, cond_dim)`` -> ``(B, C_out, T)``."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int = 5,
                 n_groups: int = 8) -> None:
        super().__init__()
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.residual = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        return self.conv2(scale * self.conv1(x) + bias) + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """Noise predictor over action chunks (see the module docstring).

    Args:
        action_dim: A, the channels of the chunk.
        cond_dim: size of the (global) observation condition.
        down_dims: channels per resolution level (the chunk is halved between levels).
        step_embed_dim: size of the diffusion-step embedding.
        kernel_size, n_groups: of every conv block.
    """

    def __init__(self, action_dim: int, cond_dim: int, down_dims: Sequence[int] = (64, 128, 256),
                 step_embed_dim: int = 64, kernel_size: int = 5, n_groups: int = 8) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        dims = [int(d) for d in down_dims]
        if not dims:
            raise ValueError("model.head.down_dims is empty: give at least one width, e.g. [64, 128, 256]")
        self.levels = len(dims)
        self.step_embedding = nn.Sequential(
            Timesteps(step_embed_dim, flip_sin_to_cos=False, downscale_freq_shift=1),
            TimestepEmbedding(step_embed_dim, 4 * step_embed_dim, act_fn="mish", out_dim=step_embed_dim))
        c = step_embed_dim + int(cond_dim)
        block = lambda i, o: FiLMResidualBlock1D(i, o, c, kernel_size, n_groups)  # noqa: E731
        self.down = nn.ModuleList()
        prev = action_dim
        for i, width in enumerate(dims):
            last = i == len(dims) - 1
            self.down.append(nn.ModuleList([block(prev, width), block(width, width),
                                            nn.Identity() if last else nn.Conv1d(width, width, 3, stride=2, padding=1)]))
            prev = width
        self.mid = nn.ModuleList([block(dims[-1], dims[-1]), block(dims[-1], dims[-1])])
        self.up = nn.ModuleList()
        for i in reversed(range(len(dims) - 1)):  # from the coarsest skip up: upsample, concat the skip, 2 blocks
            self.up.append(nn.ModuleList([nn.ConvTranspose1d(dims[i + 1], dims[i + 1], 4, stride=2, padding=1),
                                          block(dims[i + 1] + dims[i], dims[i]), block(dims[i], dims[i])]))
        self.final = nn.Sequential(Conv1dBlock(dims[0], dims[0], kernel_size, n_groups), nn.Conv1d(dims[0], action_dim, 1))

    @property
    def horizon_multiple(self) -> int:
        """The chunk length must be a multiple of this (one halving per level below the first)."""
        return 2 ** (self.levels - 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """``sample`` ``(B, T, A)``, ``timestep`` ``(B,)`` or a scalar, ``cond`` ``(B, cond_dim)`` -> ``(B, T, A)``."""
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        cond = torch.cat([self.step_embedding(t).to(cond.dtype), cond], dim=-1)
        x = sample.transpose(1, 2)
        skips = []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        skips.pop()  # the coarsest level's output is what the middle blocks continue
        for block in self.mid:
            x = block(x, cond)
        for upsample, block1, block2 in self.up:
            x = torch.cat([upsample(x), skips.pop()], dim=1)
            x = block2(block1(x, cond), cond)
        return self.final(x).transpose(1, 2)


class DiffusionHead(nn.Module):
    """Denoising-diffusion action head: ``loss(cond, actions)`` for training, ``sample(cond)`` for acting.

    Actions are normalised chunks ``(B, T, A)`` (in [-1, 1] when ``clip_sample``: the task's "limits"
    normalisation maps the demos' range there, as Chi et al. do).

    Args:
        action_dim, horizon: A and T.
        cond_dim: observation-feature size (``n_obs_steps`` x per-step feature).
        down_dims, step_embed_dim, kernel_size, n_groups: :class:`ConditionalUnet1D`.
        num_train_timesteps, beta_schedule, beta_start, beta_end, clip_sample, prediction_type:
            ``diffusers.DDPMScheduler`` (training); the DDIM sampler gets the same config.
        num_inference_steps: DDIM steps at inference.

    Raises:
        ValueError: ``horizon`` not a multiple of ``2 ** (len(down_dims) - 1)`` (:func:`check_horizon`);
            ``num_inference_steps`` outside [1, ``num_train_timesteps``]; an unknown ``prediction_type``.
    """

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, down_dims: Sequence[int] = (64, 128, 256),
                 step_embed_dim: int = 64, kernel_size: int = 5, n_groups: int = 8, num_train_timesteps: int = 100,
                 num_inference_steps: int = 10, beta_schedule: str = "squaredcos_cap_v2", beta_start: float = 1e-4,
                 beta_end: float = 0.02, clip_sample: bool = True, prediction_type: str = "epsilon") -> None:
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.unet = ConditionalUnet1D(action_dim, cond_dim, down_dims, step_embed_dim, kernel_size, n_groups)
        check_horizon(horizon, down_dims)
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(f"model.head.num_inference_steps={num_inference_steps} must be between 1 and "
                             f"model.head.num_train_timesteps={num_train_timesteps}")
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"model.head.prediction_type={prediction_type!r} must be 'epsilon' or 'sample'")
        self.action_dim, self.horizon = int(action_dim), int(horizon)
        self.num_inference_steps = int(num_inference_steps)
        self.train_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                             beta_start=beta_start, beta_end=beta_end, clip_sample=clip_sample,
                                             prediction_type=prediction_type, variance_type="fixed_small")
        self.sampler = DDIMScheduler.from_config(self.train_scheduler.config)

    def training_targets(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training batch of the DDPM schedule: ``actions`` ``(B, T, A)`` noised at uniform random steps
        -> ``(noisy (B, T, A), steps (B,) long, target (B, T, A))``, the target being the noise
        (``epsilon``) or the clean chunk (``sample``); torch's global RNG draws them."""
        noise = torch.randn_like(actions)
        steps = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (actions.shape[0],),
                              device=actions.device)
        noisy = self.train_scheduler.add_noise(actions, noise, steps)
        target = noise if self.train_scheduler.config.prediction_type == "epsilon" else actions
        return noisy, steps, target

    def loss(self, cond: torch.Tensor, actions: torch.Tensor,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss) -> torch.Tensor:
        """Noise-prediction loss of a batch (:meth:`training_targets`): ``loss_fn(U-Net output, target)``."""
        noisy, steps, target = self.training_targets(actions)
        return loss_fn(self.unet(noisy, steps, cond), target)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None,
               denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """An action chunk ``(B, T, A)`` for ``cond`` ``(B, cond_dim)``: DDIM from Gaussian noise (drawn
        from ``generator``, else torch's global RNG) in ``num_inference_steps`` steps. ``denoiser``
        replaces the U-Net (tests)."""
        denoiser = denoiser or self.unet
        x = torch.randn((cond.shape[0], self.horizon, self.action_dim), generator=generator,
                        device=cond.device if generator is None else generator.device, dtype=cond.dtype).to(cond.device)
        self.sampler.set_timesteps(self.num_inference_steps, device=cond.device)
        for t in self.sampler.timesteps:
            x = self.sampler.step(denoiser(x, t, cond), t, x, generator=generator).prev_sample
        return x
