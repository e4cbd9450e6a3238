"""Video generation with a (possibly quantized) model: jitted sampling in batches.

On a ("data", "model") mesh the model is stored sharded over "model" (see
`s2q_jax.sharding`) and each batch of videos split over "data". A denoising
step gathers each transformer block's parameters when that block runs, tied
to the block's input so that XLA cannot hoist the gather earlier; the rest
(embeddings, output head: small) is gathered at the start of the step. A
device thus holds its shards plus about one block whole, and a model larger
than one device can generate. Computing on gathered parameters, not on the
shards, is deliberate: left to partition the computation on sharded
parameters itself, XLA (jax 0.10, CPU) returned wrong outputs for the
attention projections (errors of 0.09 on outputs of order 1).
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from s2q_jax import sharding
from s2q_jax.quant.apply import graph_path, replace_module
from s2q_jax.sampling import Scheduler, make_schedule, sample, sample_keys, sample_trajectory


def _scheduler(num_steps: int, scheduler: Scheduler | None) -> Scheduler:
  """`scheduler`, or CogVideoX-2B's DDIM when None; either way with `num_steps` steps."""
  if scheduler is None:
    return make_schedule(num_inference_steps=num_steps)
  if scheduler.num_steps != num_steps:
    raise ValueError(f"the scheduler was set to {scheduler.num_steps} steps, but num_steps is "
                     f"{num_steps}; build it with load_scheduler(..., num_steps={num_steps})")
  return scheduler


def sampler(model: nnx.Module, uncond: np.ndarray, *, num_steps: int, guidance_scale: float,
            return_trajectory: bool = False, scheduler: Scheduler | None = None,
            mesh: jax.sharding.Mesh | None = None) -> Callable:
  """A jitted `f(noise, cond, key=None)` sampling with `model` (see `sampling.sample`).

  `scheduler` defaults to CogVideoX-2B's DDIM. `key` seeds a stochastic
  scheduler's step noise: one key (sample b uses fold_in(key, b)) or one per
  sample. With `return_trajectory`, f returns (x_0, `sampling.Trajectory`).
  With a `mesh`, the model's parameters are sharded over its "model" axis and
  f's batch (a multiple of the "data" axis size) is split over "data".
  """
  graphdef, state = nnx.split(model)
  place = lambda x: jnp.asarray(x)  # noqa: E731
  if mesh is not None:
    state = sharding.place(state, mesh)
    batch = NamedSharding(mesh, P(sharding.DATA))
    place = lambda x: jax.device_put(np.asarray(x), batch)  # noqa: E731
  schedule = _scheduler(num_steps, scheduler)

  @jax.jit
  def run(state, noise, cond, key):
    # Merged at every step, inside the sampler's scan: a model that writes into its own
    # state while running (its `step_context`) may only do so in the trace it was made in.
    denoiser = lambda *args: step_model(graphdef, state, mesh).denoise(*args)  # noqa: E731
    null = jnp.broadcast_to(uncond, cond.shape)
    if return_trajectory:
      return sample_trajectory(denoiser, noise, cond, null, schedule,
                               guidance_scale=guidance_scale, key=key)
    return sample(denoiser, noise, cond, null, schedule, guidance_scale=guidance_scale, key=key)

  return lambda noise, cond, key=None: run(state, place(noise), place(cond), key)


def step_model(graphdef: nnx.GraphDef, state: nnx.State, mesh: jax.sharding.Mesh | None
               ) -> nnx.Module:
  """Inside a jitted step: the model of (`graphdef`, `state`), its blocks gathering their
  parameters per call on `mesh` (module doc); without a mesh, merged as it is."""
  if mesh is None or sharding.model_size(mesh) == 1:
    return nnx.merge(graphdef, state if mesh is None else sharding.gather(state, mesh),
                     copy=True)
  model = nnx.merge(graphdef, state, copy=True)
  blocks = model.calibration_blocks()
  inside = [graph_path(path) for path, _ in blocks]
  rest = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model))
          if not any(p[:len(q)] == q for q in inside)]
  nnx.update(model, sharding.gather(nnx.from_flat_state(rest), mesh))
  for path, block in blocks:
    replace_module(model, path, _GatheredWhenCalled(block, mesh))
  return model


class _GatheredWhenCalled(nnx.Module):
  """A block whose sharded parameters are gathered whole when it is called."""

  def __init__(self, block: nnx.Module, mesh: jax.sharding.Mesh):
    self.block, self.mesh = block, mesh

  def __call__(self, *args, **kwargs):
    graphdef, state = nnx.split(self.block)
    x = next(a for a in jax.tree.leaves((args, kwargs)) if isinstance(a, jax.Array))
    # A flag that is always false but that XLA cannot know before this block's input
    # exists: selecting the shards through it orders the gather after the previous block,
    # so only this block is ever whole. (An optimization_barrier does not: XLA on CPU
    # drops it and hoists every gather to the start of the step.)
    never = x.reshape(-1)[0] * 0 > 1
    state = sharding.constrain(
        jax.tree.map(lambda p: jnp.where(never, jnp.zeros_like(p), p), state), self.mesh)
    return nnx.merge(graphdef, sharding.gather(state, self.mesh))(*args, **kwargs)


def generate(model: nnx.Module, noise: np.ndarray, cond: np.ndarray, uncond: np.ndarray, *,
             num_steps: int, guidance_scale: float, batch_size: int = 4,
             log: Callable[[str], None] | None = print, label: str = "videos",
             scheduler: Scheduler | None = None, key: jax.Array | None = None,
             mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Denoises `noise` (N, F, C, H, W) under `cond` (N, L, D); returns (N, F, C, H, W) float32.

  `uncond` (L, D) is the null condition for classifier-free guidance. The
  same noise, conditions and `key` give the same videos for any model, so
  full precision and quantized outputs compare pixel by pixel. `key` is
  needed by stochastic schedulers only: one key, video i drawing its step
  noise from fold_in(key, i) whatever `batch_size`, or (N,) keys, one per video.
  On a `mesh` (see `sampler`) a batch that the "data" axis does not divide is
  padded with copies of its last video, dropped again from the output.
  """
  run = sampler(model, uncond, num_steps=num_steps, guidance_scale=guidance_scale,
                scheduler=scheduler, mesh=mesh)
  keys = None if key is None else sample_keys(key, len(noise))
  split = 1 if mesh is None else sharding.data_size(mesh)
  out, start = [], time.perf_counter()
  for i in range(0, len(noise), batch_size):
    x, c = noise[i:i + batch_size], cond[i:i + batch_size]
    k = None if keys is None else keys[i:i + batch_size]
    n = len(x)
    x, c, k = (_pad(a, -n % split) for a in (x, c, k))
    out.append(np.asarray(run(x, c, k), np.float32)[:n])
    if log:
      done = min(i + batch_size, len(noise))
      log(f"  {label}: {done}/{len(noise)} ({time.perf_counter() - start:.0f}s)")
  return np.concatenate(out)


def _pad(a, extra: int):
  """`a` with its last row repeated `extra` more times (None stays None)."""
  if a is None or not extra:
    return a
  xp = jnp if isinstance(a, jax.Array) else np
  return xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)])
