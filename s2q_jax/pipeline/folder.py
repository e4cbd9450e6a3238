"""A diffusers CogVideoX pipeline folder (`model_index.json`) and the job settings it implies.

The job reads five components of the folder: the transformer it quantizes,
the T5 text encoder and tokenizer that turn prompts into conditions, the
VAE that decodes latents to pixels, and the scheduler. Settings the user
leaves unset (`None`) take the pipeline's values, as `CogVideoXPipeline`
would: video size from the transformer's sample size times the VAE's
compression, 50 steps, guidance 6.
"""
from __future__ import annotations

import dataclasses
import json
import os

from ml_collections import ConfigDict

from s2q_jax.errors import UserError
from s2q_jax.models.config import CogVideoXConfig
from s2q_jax.models.vae_config import CogVideoXVAEConfig

MODEL_INDEX = "model_index.json"
COMPONENTS = {  # name -> what the job needs it for
    "transformer": "the model to quantize",
    "text_encoder": "encoding the prompts",
    "tokenizer": "encoding the prompts",
    "vae": "decoding videos to pixels",
    "scheduler": "the sampler's steps",
}
# `CogVideoXPipeline.__call__` defaults, identical for CogVideoX-2B and 5B.
PIPELINE_CALL_DEFAULTS = {"CogVideoXPipeline": dict(num_steps=50, guidance_scale=6.0)}
# What the job uses without a pipeline: latent-space videos, small enough for a CPU.
TRANSFORMER_DEFAULTS = dict(frames=8, height=32, width=32, num_steps=25, guidance_scale=5.0,
                            gif_scale=4)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A validated pipeline folder: its root, class and component folders."""
  root: str
  class_name: str
  transformer_config: CogVideoXConfig
  vae_config: CogVideoXVAEConfig

  def component(self, name: str) -> str:
    return os.path.join(self.root, name)

  @property
  def spatial_scale(self) -> int:
    return self.vae_config.spatial_scale

  @property
  def temporal_scale(self) -> int:
    return self.vae_config.temporal_compression_ratio

  def default_video_size(self) -> tuple[int, int, int]:
    """(frames, height, width) in pixels: the transformer's sample size, decoded."""
    t = self.transformer_config
    s = self.spatial_scale
    return t.sample_frames, t.sample_height * s, t.sample_width * s

  def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The latent (frames, height, width) a video of this pixel size is generated at.

    Refuses sizes the VAE cannot produce exactly, naming the nearest ones.
    """
    s, ts, p = self.spatial_scale, self.temporal_scale, self.transformer_config.patch_size
    if (frames - 1) % ts:
      lower = (frames - 1) // ts * ts + 1
      raise UserError(f"eval.frames={frames}: the VAE decodes {ts}·k + 1 frames; use {lower} "
                      f"or {lower + ts}")
    for name, size in (("height", height), ("width", width)):
      if size % (s * p):
        lower = size // (s * p) * s * p
        raise UserError(f"eval.{name}={size} must be a multiple of {s * p} (the VAE's ×{s} "
                        f"times the patch size {p}); use {lower or s * p} or {lower + s * p}")
    return (frames - 1) // ts + 1, height // s, width // s


def is_pipeline(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


def open_pipeline(path: str) -> Pipeline:
  """Reads `model_index.json` and checks that every component the job needs is there."""
  index_path = os.path.join(path, MODEL_INDEX)
  try:
    with open(index_path) as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{index_path} is not valid JSON: {e}") from None
  if not isinstance(index, dict):
    raise UserError(f"{index_path} must hold a JSON object")
  class_name = index.get("_class_name")
  if class_name not in PIPELINE_CALL_DEFAULTS:
    raise UserError(f"{index_path}: pipeline class {class_name!r} is not supported; the job "
                    f"runs {', '.join(PIPELINE_CALL_DEFAULTS)} folders")
  for name, why in COMPONENTS.items():
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
      raise UserError(f"{index_path} lists no {name!r} component (needed for {why}); a "
                      f"complete diffusers {class_name} folder has {', '.join(COMPONENTS)}")
    if not os.path.isdir(os.path.join(path, name)):
      raise UserError(f"{path} has no {name}/ folder although {MODEL_INDEX} lists it (needed "
                      f"for {why}): copy the whole pipeline")
  return Pipeline(path, class_name, _read(path, "transformer", CogVideoXConfig),
                  _read(path, "vae", CogVideoXVAEConfig))


def _read(path: str, name: str, config_class):
  config_path = os.path.join(path, name, "config.json")
  try:
    with open(config_path) as f:
      return config_class.from_dict(json.load(f))
  except FileNotFoundError:
    raise UserError(f"{os.path.join(path, name)} has no config.json") from None
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise UserError(f"{config_path} is not a supported {config_class.__name__}: {e}") from None


def transformer_folder(path: str) -> str:
  """The transformer's folder: `path` itself, or the pipeline's transformer/."""
  return os.path.join(path, "transformer") if is_pipeline(path) else path


def resolve(cfg: ConfigDict) -> tuple[ConfigDict, Pipeline | None]:
  """A copy of `cfg` with every unset video and sampler setting filled in, and the pipeline.

  Explicit values win. With a pipeline, `eval.frames/height/width` are the
  decoded video's size in pixels; otherwise the latent video's size.
  """
  pipe = open_pipeline(cfg.model.path) if is_pipeline(cfg.model.path) else None
  resolved = cfg.copy_and_resolve_references()
  if pipe is None:
    for setting in ("eval.prompts", "calib.prompts"):
      section, key = setting.split(".")
      if cfg[section][key]:
        where = f"model.path={cfg.model.path!r}" if cfg.model.path else "the embedded model"
        raise UserError(f"{setting} needs a pipeline folder (one with {MODEL_INDEX} and a text "
                        f"encoder), but {where} has none: pass the pipeline folder as "
                        "--config.model.path, or leave the prompts unset")
    defaults = dict(TRANSFORMER_DEFAULTS)
  else:
    frames, height, width = pipe.default_video_size()
    defaults = dict(frames=frames, height=height, width=width, gif_scale=1,
                    **PIPELINE_CALL_DEFAULTS[pipe.class_name])
  with resolved.unlocked():
    for section, key in (("eval", "frames"), ("eval", "height"), ("eval", "width"),
                         ("eval", "gif_scale"), ("sampler", "num_steps"),
                         ("sampler", "guidance_scale")):
      if resolved[section][key] is None:
        resolved[section][key] = defaults[key]
    resolved.sampler.guidance_scale = float(resolved.sampler.guidance_scale)
  return resolved, pipe
