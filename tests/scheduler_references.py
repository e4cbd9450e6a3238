"""What the scheduler tests share: the scheduler configs pipelines ship, and diffusers references."""
import pytest

diffusers = pytest.importorskip("diffusers")


TOL = 1e-5
# The scheduler_config.json files the pipelines ship (metadata keys left out).
COGVIDEOX_5B = {  # THUDM/CogVideoX-5b
    "_class_name": "CogVideoXDPMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True,
    "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing",
    "trained_betas": None}
COGVIDEOX_2B_DPM = {**COGVIDEOX_5B, "snr_shift_scale": 3.0}  # 2B's numbers, DPM solver
COGVIDEOX_2B = {**COGVIDEOX_2B_DPM, "_class_name": "CogVideoXDDIMScheduler"}  # THUDM/CogVideoX-2b
HUNYUAN_VIDEO = {  # hunyuanvideo-community/HunyuanVideo
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 7.0,
    "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
    "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False}
WAN_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers (480p: flow_shift 3)
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2,
    "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}



def reference(config, num_steps, sigmas=None):
  """diffusers' scheduler for `config`, set to `num_steps` steps (or `sigmas`)."""
  ref = getattr(diffusers, config["_class_name"]).from_config(config)
  if sigmas is None:
    ref.set_timesteps(num_steps)
  else:
    ref.set_timesteps(sigmas=sigmas)
  return ref


def toy_denoiser(xp):
  """An analytic stand-in for a model: depends on input, condition and timestep."""
  def denoise(x, cond, t):
    t = xp.asarray(t, xp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return xp.tanh(x * 0.5 + cond.mean(axis=(1, 2)).reshape(t.shape)) * (t / 1000.0) - 0.1 * x
  return denoise

