"""Data for the embedded model: procedural videos and GIF output."""
from s2q_jax.data import gif, procedural
from s2q_jax.data.gif import save_gif, save_side_by_side, side_by_side, to_uint8, upscale
from s2q_jax.data.procedural import (CLASS_NAMES, NUM_CLASSES, batch_iterator, class_embeddings,
                                     class_name, sample_videos)

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "batch_iterator", "class_embeddings", "class_name", "gif",
           "procedural", "sample_videos", "save_gif", "save_side_by_side", "side_by_side",
           "to_uint8", "upscale"]
