"""Samplers for video diffusion models: diffusers' schedulers in JAX, one sampling loop."""
from s2q_jax.sampling.cogvideox_dpm import CogVideoXDPMSchedule, make_dpm_schedule, sample_keys
from s2q_jax.sampling.ddim import (DDIMSchedule, add_noise, ddim_step, make_schedule, predicted_x0,
                                   train_alphas_cumprod, v_target)
from s2q_jax.sampling.flow_match import FlowMatchEulerSchedule, make_flow_match_schedule
from s2q_jax.sampling.loop import (Denoiser, Scheduler, Trajectory, guided, initial_noise, sample,
                                   sample_trajectory)
from s2q_jax.sampling.scheduler_config import (SUPPORTED_CLASSES, load_scheduler,
                                               read_scheduler_config)
from s2q_jax.sampling.unipc import UniPCSchedule, make_unipc_schedule

__all__ = ["CogVideoXDPMSchedule", "DDIMSchedule", "Denoiser", "FlowMatchEulerSchedule",
           "SUPPORTED_CLASSES", "Scheduler", "Trajectory", "UniPCSchedule", "add_noise",
           "ddim_step", "guided", "initial_noise", "load_scheduler", "make_dpm_schedule",
           "make_flow_match_schedule", "make_schedule", "make_unipc_schedule", "predicted_x0",
           "read_scheduler_config", "sample", "sample_keys", "sample_trajectory",
           "train_alphas_cumprod", "v_target"]
