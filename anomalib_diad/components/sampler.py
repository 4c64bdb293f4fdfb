"""DiAD's noising and deterministic DDIM sampler as fixed tensors: pure torch, exportable, no host syncs.

The noise schedule comes from diffusers' ``DDIMScheduler`` configured as ldm (see
:func:`~anomalib_diad.components.diffusers_models.build_ddim_scheduler`); the per-step constants
are copied into buffers once, so the sampling loop has a fixed length and indexes buffers with
Python integers only (torch.export and ONNX friendly). With the official schedule,
``DDIMScheduler.step`` with ``eta=0`` gives the same update (checked in the tests).

Two step schedules (``schedule``):

* ``"official"``: ldm's ``uniform`` DDIM steps over the whole chain (10 steps: 901, 801, ..., 1),
  whatever the start. The official code noises to t = 999 but its first update assumes t = 901
  (its truncation line is commented out); reproduced as is, so it needs ``noise_timestep=999``.
* ``"truncated"``: an img2img-like start: ``num_steps`` evenly spaced timesteps from
  ``noise_timestep`` down (``t_s, ..., t_s / num_steps``, rounded), the first update using the
  noise level of ``t_s``.

The last update ends at ``alpha_cumprod[0]``, as ldm's and Stable Diffusion's DDIM (diffusers'
``set_alpha_to_one=False``): its output is the predicted clean latent re-noised with the predicted
noise to the first timestep's small noise level (``sqrt(1 - alpha_cumprod[0]) = 0.029``). With
``set_alpha_to_one`` it ends at the clean latent itself (alpha product 1).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import nn

from anomalib_diad.components.diffusers_models import NUM_TRAIN_TIMESTEPS, build_ddim_scheduler
from anomalib_multiclass.options import parse_option


class DDIMSchedule(str, Enum):
    """DDIM timesteps: ldm's ``official`` ones from t = 999, or ``truncated`` ones from ``noise_timestep``."""

    OFFICIAL = "official"
    TRUNCATED = "truncated"
OFFICIAL_NOISE_TIMESTEP = NUM_TRAIN_TIMESTEPS - 1


class DDIMSampler(nn.Module):
    """Noise latents to ``noise_timestep`` and denoise them with ``num_steps`` DDIM steps (eta = 0).

    Args:
        num_steps: DDIM steps (paper: 10).
        noise_timestep: timestep ``t_s`` of the noised start latent (paper: 999).
        schedule: ``"official"`` (paper: 901, 801, ..., 1 whatever the start) or ``"truncated"``
            (steps at or below ``t_s`` only, starting at ``t_s``); see the module docstring.
        set_alpha_to_one: end the last update at the clean latent instead of ``alpha_cumprod[0]`` (paper: False).
    """

    def __init__(
        self,
        num_steps: int = 10,
        noise_timestep: int = 999,
        schedule: str = "official",
        set_alpha_to_one: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
            msg = f"ddim_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps}."
            raise ValueError(msg)
        if not 0 <= noise_timestep < NUM_TRAIN_TIMESTEPS:
            msg = f"noise_timestep must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {noise_timestep}."
            raise ValueError(msg)
        schedule = parse_option(DDIMSchedule, schedule, "ddim_schedule")
        if schedule == "official" and noise_timestep != OFFICIAL_NOISE_TIMESTEP:
            first_step = (num_steps - 1) * (NUM_TRAIN_TIMESTEPS // num_steps) + 1
            msg = (
                f"ddim_schedule 'official' always steps from {first_step} "
                f"and so only fits noise_timestep {OFFICIAL_NOISE_TIMESTEP}, got {noise_timestep}: set ddim_schedule "
                "'truncated' to start the reverse process at noise_timestep."
            )
            raise ValueError(msg)
        if schedule == "truncated" and num_steps > noise_timestep:
            msg = (
                f"ddim_steps {num_steps} do not fit below noise_timestep {noise_timestep} (one timestep each): "
                f"use at most {noise_timestep} steps or a later noise_timestep."
            )
            raise ValueError(msg)
        scheduler = build_ddim_scheduler(set_alpha_to_one)
        alphas_cumprod = scheduler.alphas_cumprod.double()
        if schedule == "official":
            scheduler.set_timesteps(num_steps)
            timesteps = scheduler.timesteps.long()
            previous = timesteps - NUM_TRAIN_TIMESTEPS // num_steps
        else:
            spaced = torch.linspace(noise_timestep, 0, num_steps + 1, dtype=torch.float64).round().long()
            timesteps, previous = spaced[:-1], spaced[1:]
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        alphas_previous = torch.where(previous >= 0, alphas_cumprod[previous.clamp_min(0)], final)
        alphas_previous[-1] = final  # alpha_cumprod[0], or 1 with set_alpha_to_one (truncated: also from t = 0)
        self.num_steps = num_steps
        self.noise_timestep = noise_timestep
        self.schedule = schedule
        self.set_alpha_to_one = set_alpha_to_one
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.register_buffer("alphas", alphas_cumprod[timesteps].float(), persistent=False)
        self.register_buffer("alphas_previous", alphas_previous.float(), persistent=False)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps`` for latents and noise ``[B, 4, h, w]``, timesteps ``[B]``."""
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

    def noise_to_start(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The start latent ``x_T``: ``latents`` noised to ``noise_timestep``."""
        alpha = self.alphas_cumprod[self.noise_timestep]
        return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

    def step(self, index: int, noise_prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One DDIM update (eta = 0) from ``timesteps[index]`` to the previous timestep."""
        alpha, alpha_previous = self.alphas[index], self.alphas_previous[index]
        predicted_original = (latents - (1 - alpha).sqrt() * noise_prediction) / alpha.sqrt()
        return alpha_previous.sqrt() * predicted_original + (1 - alpha_previous).sqrt() * noise_prediction

    def sample(
        self,
        start_latents: torch.Tensor,
        predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Denoise ``start_latents`` ``[B, 4, h, w]``; ``predict_noise(latents, timesteps [B])`` returns ``eps``."""
        latents = start_latents
        for index in range(self.num_steps):
            timesteps = self.timesteps[index].expand(latents.shape[0])
            latents = self.step(index, predict_noise(latents, timesteps), latents)
        return latents
