"""Samplers for video diffusion models."""
from s2q_jax.sampling.ddim import (DDIMSchedule, Denoiser, add_noise, ddim_step, guided,
                                   initial_noise, make_schedule, predicted_x0, sample,
                                   train_alphas_cumprod, v_target)

__all__ = ["DDIMSchedule", "Denoiser", "add_noise", "ddim_step", "guided", "initial_noise",
           "make_schedule", "predicted_x0", "sample", "train_alphas_cumprod", "v_target"]
