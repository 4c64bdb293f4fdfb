"""DiAD's noising and deterministic DDIM sampler as fixed tensors: pure torch, exportable, no host syncs.

The schedule comes from diffusers' ``DDIMScheduler`` configured as ldm (see
:func:`~anomalib_diad.components.diffusers_models.build_ddim_scheduler`); its per-step constants
are copied into buffers once, so the sampling loop has a fixed length and indexes buffers with
Python integers only (torch.export and ONNX friendly). ``DDIMScheduler.step`` with ``eta=0``
gives the same update (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from anomalib_diad.components.diffusers_models import NUM_TRAIN_TIMESTEPS, build_ddim_scheduler


class DDIMSampler(nn.Module):
    """Noise latents to ``noise_timestep`` and denoise them with ``num_steps`` DDIM steps (eta = 0).

    Args:
        num_steps: DDIM steps (paper: 10, timesteps 901, 801, ..., 1).
        noise_timestep: timestep of the noised start latent (paper: 999, although the first DDIM
            update assumes 901; reproduced as the official code).
    """

    def __init__(self, num_steps: int = 10, noise_timestep: int = 999) -> None:
        super().__init__()
        if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
            msg = f"ddim_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps}."
            raise ValueError(msg)
        if not 0 <= noise_timestep < NUM_TRAIN_TIMESTEPS:
            msg = f"noise_timestep must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {noise_timestep}."
            raise ValueError(msg)
        scheduler = build_ddim_scheduler()
        scheduler.set_timesteps(num_steps)
        alphas_cumprod = scheduler.alphas_cumprod.double()
        timesteps = scheduler.timesteps.long()
        previous = timesteps - NUM_TRAIN_TIMESTEPS // num_steps
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        alphas_previous = torch.where(previous >= 0, alphas_cumprod[previous.clamp_min(0)], final)
        self.num_steps = num_steps
        self.noise_timestep = noise_timestep
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
