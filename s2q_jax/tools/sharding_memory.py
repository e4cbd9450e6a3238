"""Per-device parameter memory with the model split over 1, 2, 4, … devices (`mesh.model`).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m s2q_jax.tools.sharding_memory

For the embedded model (full precision, and W4A6 with frozen int8 codes), and
for one CogVideoX-2B-width block's calibration state (frozen weights, learned
state, Adam moments), the bytes the most loaded device holds under
`s2q_jax.sharding`'s rule. For the full-precision model it also compiles one
forward pass as a generation step runs it (each block's parameters gathered
when it runs, batch split over "data") and reports XLA's own per-device
figures: the arguments (the parameter shards) and the temporaries, which
include the one block gathered at a time.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from s2q_jax import embedded, generation, quant, sharding
from s2q_jax.benchmark import PRESETS
from s2q_jax.distillation.block_reconstruction import _optimizer
from s2q_jax.job_config import base_config
from s2q_jax.methods import s2q
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D, load_pretrained
from s2q_jax.quant.qlinear import QuantParam


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f}"


def _step_memory(model, mesh) -> tuple[int, int]:
  """(argument, temporary) bytes per device of one jitted forward pass on `mesh`."""
  graphdef, state = nnx.split(model)
  cfg = model.config
  latents = jnp.zeros((sharding.data_size(mesh), 2, cfg.in_channels, 32, 32))
  text = jnp.zeros((sharding.data_size(mesh), cfg.max_text_seq_length, cfg.text_embed_dim))
  batch = NamedSharding(mesh, P(sharding.DATA))
  forward = jax.jit(lambda s, x, c: generation.step_model(graphdef, s, mesh)(
      x, c, jnp.zeros(x.shape[:1])))  # as a generation step runs it
  compiled = forward.lower(sharding.place(state, mesh), jax.device_put(latents, batch),
                           jax.device_put(text, batch)).compile()
  stats = compiled.memory_analysis()
  return stats.argument_size_in_bytes, stats.temp_size_in_bytes


def _block_state(preset: str):
  """One quantized block at a preset's width with S²Q's state and Adam moments, on the host."""
  cfg = CogVideoXConfig(**{**PRESETS[preset][0], "num_layers": 1})
  block = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0)).transformer_blocks[0]
  quant.quantize_model(block, quant.make_rules(4, 6))
  recipe = s2q.recipe(base_config(4, 6, "s2q"))
  recipe.prepare_block(block, "transformer_blocks.0")
  learned = nnx.state(block, QuantParam)
  moments = _optimizer(1e-3, 1).init(learned)
  return nnx.state(block), moments


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
  args = parser.parse_args()
  fp = load_pretrained(embedded.path())
  q = nnx.clone(fp)
  quant.quantize_model(q, quant.make_rules(4, 6))
  quant.freeze_all(q)
  block = _block_state(args.preset)
  n = jax.device_count()
  rows = []
  for model in [m for m in (1, 2, 4, 8, 16) if n % m == 0]:
    mesh = sharding.make_mesh(model)
    arg, temp = _step_memory(fp, mesh)
    rows.append([f"{n // model}×{model}",
                 _mib(sharding.per_device_bytes(sharding.place(nnx.state(fp), mesh))),
                 _mib(sharding.per_device_bytes(sharding.place(nnx.state(q), mesh))),
                 _mib(arg), _mib(temp),
                 _mib(sharding.per_device_bytes(sharding.place(block, mesh)))])
  header = ["mesh data×model", "FP params", "W4A6 params (codes)", "FP forward: arguments",
            "FP forward: temporaries", f"{args.preset} block + S²Q state + Adam"]
  print("MiB per device (the most loaded one)")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
