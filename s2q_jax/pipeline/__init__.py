"""The main job on a diffusers pipeline folder: components, prompts, decoded videos."""
from s2q_jax.pipeline.folder import (Pipeline, is_pipeline, open_pipeline, resolve,
                                     transformer_folder)
from s2q_jax.pipeline.prompts import (CACHE_NAME, Conditions, default_prompt_file, embed,
                                      prompt_sets, read_prompts)
from s2q_jax.pipeline.videos import FPS, decode, mp4_available, write_side_by_side

__all__ = ["CACHE_NAME", "Conditions", "FPS", "Pipeline", "decode", "default_prompt_file", "embed",
           "is_pipeline", "mp4_available", "open_pipeline", "prompt_sets", "read_prompts",
           "resolve", "transformer_folder", "write_side_by_side"]
