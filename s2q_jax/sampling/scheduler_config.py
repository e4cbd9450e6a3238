"""Schedulers from a diffusers pipeline's `scheduler/scheduler_config.json`.

The file names a diffusers class (`_class_name`) and its constructor
arguments; absent ones take that class's defaults, reproduced here from
diffusers 0.42 (tests/test_schedulers.py checks them against the installed
class). Every argument is one of:
- passed on: it shapes the schedule (`make_*` keyword);
- restricted: only the listed values are implemented, since others change
  the steps (a clear error names the option, its value and what works);
- inert: it cannot change this class's steps in the supported setting
  (e.g. clip_sample, which CogVideoX's schedulers never read; the beta
  schedule of UniPC, whose flow sigmas replace it).
An argument this module does not know is refused as well: a newer diffusers
may have given it a meaning.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from s2q_jax.sampling.cogvideox_dpm import make_dpm_schedule
from s2q_jax.sampling.ddim import make_schedule
from s2q_jax.sampling.flow_match import make_flow_match_schedule
from s2q_jax.sampling.loop import Scheduler
from s2q_jax.sampling.unipc import make_unipc_schedule

CONFIG_NAME = "scheduler_config.json"


@dataclasses.dataclass(frozen=True)
class _Spec:
  make: Callable[..., Scheduler]  # make(num_steps, **keywords)
  defaults: Mapping[str, Any]  # the diffusers constructor's defaults
  passed: Mapping[str, str]  # config key -> keyword of `make`
  restricted: Mapping[str, tuple]  # config key -> supported values
  inert: frozenset[str]
  takes_sigmas: bool = False  # whether `make` accepts explicit sigmas
  why: Mapping[str, str] = dataclasses.field(default_factory=dict)  # notes for refusals


_COGVIDEOX_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", clip_sample_range=1.0, sample_max_value=1.0,
    timestep_spacing="leading", rescale_betas_zero_snr=False, snr_shift_scale=3.0)
_COGVIDEOX_PASSED = {k: k for k in ("num_train_timesteps", "beta_start", "beta_end",
                                    "beta_schedule", "set_alpha_to_one", "steps_offset",
                                    "timestep_spacing", "snr_shift_scale")}
_COGVIDEOX_PASSED["rescale_betas_zero_snr"] = "rescale_zero_snr"
_COGVIDEOX_RESTRICTED = {"prediction_type": ("v_prediction",), "trained_betas": (None,)}
_COGVIDEOX_INERT = frozenset({"clip_sample", "clip_sample_range", "sample_max_value"})
_NO_SIGMA_CONVERSIONS = {"use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
                         "use_beta_sigmas": (False,), "use_dynamic_shifting": (False,),
                         "shift_terminal": (None,)}

_SPECS = {
    "CogVideoXDDIMScheduler": _Spec(make_schedule, _COGVIDEOX_DEFAULTS, _COGVIDEOX_PASSED,
                                    _COGVIDEOX_RESTRICTED, _COGVIDEOX_INERT),
    "CogVideoXDPMScheduler": _Spec(make_dpm_schedule, _COGVIDEOX_DEFAULTS, _COGVIDEOX_PASSED,
                                   _COGVIDEOX_RESTRICTED, _COGVIDEOX_INERT),
    "FlowMatchEulerDiscreteScheduler": _Spec(
        make_flow_match_schedule,
        defaults=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
                      use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False, time_shift_type="exponential",
                      stochastic_sampling=False),
        passed={"num_train_timesteps": "num_train_timesteps", "shift": "shift"},
        restricted={**_NO_SIGMA_CONVERSIONS, "invert_sigmas": (False,),
                    "stochastic_sampling": (False,)},
        # Read only by resolution-dependent (dynamic) shifting.
        inert=frozenset({"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                         "time_shift_type"}),
        takes_sigmas=True,
        why={"use_dynamic_shifting": "it needs a resolution-dependent mu per call; give a "
                                     "static `shift` instead"}),
    "UniPCMultistepScheduler": _Spec(
        make_unipc_schedule,
        defaults=dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                      beta_schedule="linear", trained_betas=None, solver_order=2,
                      prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True,
                      solver_type="bh2", lower_order_final=True, disable_corrector=[],
                      solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                      timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                      rescale_betas_zero_snr=False, use_dynamic_shifting=False,
                      time_shift_type="exponential", sigma_min=None, sigma_max=None,
                      shift_terminal=None),
        passed={k: k for k in ("num_train_timesteps", "solver_order", "lower_order_final",
                               "disable_corrector", "flow_shift")},
        # diffusers maps the DPM-Solver names "midpoint", "heun" and "logrho" to bh2.
        restricted={**_NO_SIGMA_CONVERSIONS, "use_flow_sigmas": (True,),
                    "prediction_type": ("flow_prediction",), "predict_x0": (True,),
                    "thresholding": (False,), "solver_p": (None,),
                    "solver_type": ("bh2", "midpoint", "heun", "logrho"),
                    "final_sigmas_type": ("zero",)},
        # The VP beta schedule and its timestep spacing are replaced by the flow sigmas;
        # thresholding and sigma conversions are off.
        inert=frozenset({"beta_start", "beta_end", "beta_schedule", "trained_betas",
                         "rescale_betas_zero_snr", "timestep_spacing", "steps_offset",
                         "dynamic_thresholding_ratio", "sample_max_value", "time_shift_type",
                         "sigma_min", "sigma_max"}),
        takes_sigmas=True,
        why={"solver_type": "bh1 returns NaN on the final step to sigma 0 in diffusers",
             "use_flow_sigmas": "only UniPC's flow-matching setting (Wan) is implemented"}),
}
SUPPORTED_CLASSES = tuple(_SPECS)


def read_scheduler_config(source: str | os.PathLike) -> dict:
  """The JSON of a scheduler_config.json, its scheduler folder, or a pipeline folder."""
  path = os.fspath(source)
  if os.path.isdir(path):
    candidates = [os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
      raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or its scheduler/ folder")
    path = found[0]
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"scheduler config {path} does not exist")
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
  return config


def load_scheduler(source: str | os.PathLike | Mapping[str, Any], num_steps: int, *,
                   sigmas: Sequence[float] | None = None) -> Scheduler:
  """The scheduler a diffusers config describes, set to `num_steps` steps.

  Args:
    source: a scheduler_config.json, the folder holding it, a pipeline folder
      (its scheduler/ subfolder), or the config as a dict.
    num_steps: inference steps, as `scheduler.set_timesteps(num_steps)`.
    sigmas: explicit noise levels for the flow-matching schedulers, as a
      pipeline passes to `set_timesteps(sigmas=...)` (HunyuanVideo:
      np.linspace(1, 0, num_steps + 1)[:-1]).
  """
  config = dict(source) if isinstance(source, Mapping) else read_scheduler_config(source)
  name = config.get("_class_name")
  if name not in _SPECS:
    raise ValueError(f"scheduler class {name!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_CLASSES)}")
  spec = _SPECS[name]
  options = {**spec.defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
  unknown = sorted(set(options) - set(spec.defaults))
  if unknown:
    raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)} (from a newer diffusers?); "
                     f"known: {', '.join(sorted(spec.defaults))}")
  for key, values in spec.restricted.items():
    if options[key] not in values:
      note = f" ({spec.why[key]})" if key in spec.why else ""
      raise ValueError(f"{name}: {key}={options[key]!r} is not supported{note}; supported: "
                       f"{', '.join(map(repr, values))}")
  keywords = {arg: options[key] for key, arg in spec.passed.items()}
  if sigmas is not None:
    if not spec.takes_sigmas:
      raise ValueError(f"{name} takes no explicit sigmas; only the flow-matching schedulers do")
    keywords["sigmas"] = sigmas
  return spec.make(num_steps, **keywords)


# THUDM/CogVideoX-2b's scheduler/scheduler_config.json: the job's schedule without one.
COGVIDEOX_2B_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True,
    "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing",
    "trained_betas": None}


def scheduler_for(name: str, folder: str | None, num_steps: int,
                  default: Mapping[str, Any] | None = None) -> Scheduler:
  """The scheduler a job samples with: `name` ('' or a diffusers class) for a model `folder`.

  '' takes the folder's scheduler_config.json (itself or its scheduler/
  sub-folder) when present, else `default` (the architecture's pipeline
  scheduler; None: CogVideoX-2B's). A class name re-reads that
  config as this class, as diffusers' `Class.from_config(pipe.scheduler.config)`
  swaps a pipeline's scheduler: options the class does not know are dropped.
  """
  config = dict(default) if default is not None else COGVIDEOX_2B_CONFIG
  if folder:
    try:
      config = read_scheduler_config(folder)
    except FileNotFoundError:
      pass
  if name:
    if name not in _SPECS:
      raise ValueError(f"unknown scheduler {name!r}: use '' (the model's own) or one of "
                       f"{', '.join(SUPPORTED_CLASSES)}")
    known = _SPECS[name].defaults
    config = {**{k: v for k, v in config.items() if k in known}, "_class_name": name}
  return load_scheduler(config, num_steps)
