"""Loading schedulers from diffusers' scheduler_config.json: defaults, sources, refusals."""
import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.sampling import (CogVideoXDPMSchedule, DDIMSchedule, SUPPORTED_CLASSES,
                              load_scheduler, make_schedule, make_unipc_schedule, sample)
from s2q_jax.sampling import scheduler_config
from scheduler_references import (COGVIDEOX_5B, HUNYUAN_VIDEO, WAN_1_3B, diffusers,
                                  reference as _reference, toy_denoiser as _toy_denoiser)


@pytest.mark.parametrize("name", SUPPORTED_CLASSES)
def test_defaults_are_diffusers_and_every_option_is_classified(name):
  spec = scheduler_config._SPECS[name]
  params = inspect.signature(getattr(diffusers, name).__init__).parameters
  assert spec.defaults == {k: p.default for k, p in params.items() if k != "self"}
  groups = [set(spec.passed), set(spec.restricted), set(spec.inert)]
  assert sum(map(len, groups)) == len(set.union(*groups)) == len(spec.defaults)
  assert set.union(*groups) == set(spec.defaults)


def test_load_scheduler_reads_a_file_a_scheduler_folder_or_a_pipeline(tmp_path):
  import json
  folder = tmp_path / "pipeline" / "scheduler"
  folder.mkdir(parents=True)
  (folder / "scheduler_config.json").write_text(json.dumps(
      {**WAN_1_3B, "_diffusers_version": "0.33.0.dev0"}))
  expected = make_unipc_schedule(20, flow_shift=3.0).timesteps
  for source in (folder / "scheduler_config.json", folder, tmp_path / "pipeline", str(folder)):
    np.testing.assert_array_equal(load_scheduler(source, 20).timesteps, expected)
  ddim = load_scheduler({**COGVIDEOX_5B, "_class_name": "CogVideoXDDIMScheduler"}, 20)
  assert isinstance(ddim, DDIMSchedule)
  # Absent options take diffusers' class defaults (here shift 1, 1000 train steps).
  partial = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
  np.testing.assert_array_equal(load_scheduler(partial, 7).timesteps,
                                _reference(partial, 7).timesteps.numpy())


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "EulerDiscreteScheduler"}, "'EulerDiscreteScheduler' is not supported; "
     "supported: CogVideoXDDIMScheduler, CogVideoXDPMScheduler"),
    ({}, "None is not supported"),
    ({**COGVIDEOX_5B, "prediction_type": "epsilon"},
     "prediction_type='epsilon' is not supported; supported: 'v_prediction'"),
    ({**HUNYUAN_VIDEO, "use_dynamic_shifting": True}, "use_dynamic_shifting=True is not "
     "supported \\(it needs a resolution-dependent mu"),
    ({**HUNYUAN_VIDEO, "stochastic_sampling": True}, "stochastic_sampling=True"),
    ({**WAN_1_3B, "solver_type": "bh1"}, "solver_type='bh1' is not supported \\(bh1 returns NaN"),
    ({**WAN_1_3B, "use_flow_sigmas": False}, "use_flow_sigmas=False"),
    ({**WAN_1_3B, "final_sigmas_type": "sigma_min"}, "supported: 'zero'"),
    ({**WAN_1_3B, "lower_order_final": False}, "lower_order_final=False needs solver_order=1"),
    ({**WAN_1_3B, "flow_shift": 0.0}, "flow_shift must be positive"),
    ({**WAN_1_3B, "shiny_new_option": 1}, "unknown option\\(s\\) shiny_new_option"),
    ({**COGVIDEOX_5B, "timestep_spacing": "karras"}, "timestep_spacing"),
    ({**COGVIDEOX_5B, "beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
])
def test_bad_configs_are_refused_with_what_is_supported(config, message):
  with pytest.raises(ValueError, match=message):
    load_scheduler(config, 10)


def test_bad_sources_and_arguments_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
    load_scheduler(tmp_path, 10)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_scheduler(tmp_path / "missing.json", 10)
  (tmp_path / "scheduler_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    load_scheduler(tmp_path, 10)
  with pytest.raises(ValueError, match="takes no explicit sigmas"):
    load_scheduler(COGVIDEOX_5B, 3, sigmas=[1.0, 0.5, 0.2])
  with pytest.raises(ValueError, match="num_steps=3 values"):
    load_scheduler(HUNYUAN_VIDEO, 3, sigmas=[1.0, 0.5])
  with pytest.raises(ValueError, match="decrease within"):
    load_scheduler(WAN_1_3B, 3, sigmas=[0.5, 1.0, 0.2])
  with pytest.raises(ValueError, match="num_inference_steps"):
    load_scheduler(COGVIDEOX_5B, 0)
  with pytest.raises(ValueError, match="num_steps must be at least 1"):
    load_scheduler(WAN_1_3B, 0)
  schedule = load_scheduler(COGVIDEOX_5B, 3)
  with pytest.raises(ValueError, match="pass a PRNG key"):
    sample(_toy_denoiser(jnp), jnp.zeros((1, 2)), jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)),
           schedule)


def test_job_scheduler_is_the_folders_or_a_named_class_on_its_config(tmp_path):
  # No folder config: CogVideoX-2B's DDIM, the schedule the job always used.
  default = scheduler_config.scheduler_for("", None, 7)
  expected = make_schedule(7)
  np.testing.assert_array_equal(default.timesteps, expected.timesteps)
  np.testing.assert_array_equal(default.alphas_cumprod, expected.alphas_cumprod)
  np.testing.assert_array_equal(default.timesteps, _reference(scheduler_config.COGVIDEOX_2B_CONFIG,
                                                              7).timesteps.numpy())
  # A pipeline folder's scheduler/scheduler_config.json is read.
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(COGVIDEOX_5B))
  assert isinstance(scheduler_config.scheduler_for("", str(tmp_path), 5), CogVideoXDPMSchedule)
  # A class name swaps the class and keeps the folder's options, as diffusers' from_config.
  swapped = scheduler_config.scheduler_for("CogVideoXDDIMScheduler", str(tmp_path), 5)
  ref = diffusers.CogVideoXDDIMScheduler.from_config(COGVIDEOX_5B)
  ref.set_timesteps(5)
  assert isinstance(swapped, DDIMSchedule)
  np.testing.assert_array_equal(swapped.timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(swapped.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown scheduler 'ddpm'.*CogVideoXDPMScheduler"):
    scheduler_config.scheduler_for("ddpm", str(tmp_path), 5)
  # A class the folder's options do not fit is refused, naming the option.
  with pytest.raises(ValueError, match="UniPCMultistepScheduler: use_flow_sigmas=False is not"):
    scheduler_config.scheduler_for("UniPCMultistepScheduler", str(tmp_path), 5)
