"""Trains the small class-conditional video DiT shipped as the default model.

  python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py:base
  python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py:refine

v-prediction on procedural videos (`s2q_jax.data.procedural`) with the
CogVideoX noise schedule the sampler uses, classifier-free-guidance dropout
and an EMA of the weights. Checkpoints every `checkpoint_every` steps and
resumes from the last one; at the end the weights are written in diffusers
format to `config.output` (the EMA weights if `ema_decay` > 0), with the
condition embeddings beside. `config.init_from` starts from an exported model
(a warm restart of the learning-rate schedule) instead of random weights.
`config.max_minutes` bounds one run's wall time (a lent accelerator's time
slot): at the limit it checkpoints and exports what it has, and the same
command resumes it later. Batches are drawn on a host thread ahead of the
step, so an accelerator does not wait for numpy.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from conversion.flax_to_diffusers import save_diffusers
from conversion.output_dir import atomic_output_dir
from s2q_jax.data import procedural
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D, load_pretrained
from s2q_jax.conditions import save_conditions
from s2q_jax.sampling import add_noise, make_schedule, v_target

# No default file: one would be read at import, relative to wherever that happens.
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/train_embedded.py:<stage>",
                                          lock_config=True)


def _train_step_fn(schedule, num_timesteps: int, null_cond: jax.Array, cond_dropout: float):
  @nnx.jit
  def step(model, optimizer, ema, videos, cond, key):
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    b = videos.shape[0]
    t = jax.random.randint(k_t, (b,), 0, num_timesteps)
    noise = jax.random.normal(k_noise, videos.shape, videos.dtype)
    drop = jax.random.uniform(k_drop, (b, 1, 1)) < cond_dropout
    cond = jnp.where(drop, null_cond[None], cond)
    noisy, target = add_noise(schedule, videos, noise, t), v_target(schedule, videos, noise, t)

    def loss_fn(m):
      return jnp.mean(jnp.square(m(noisy, cond, t) - target))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    ema.update(model)
    return loss

  return step


class EMA(nnx.Module):
  """Exponential moving average of a model's parameters."""

  def __init__(self, model: nnx.Module, decay: float):
    self.decay = decay
    self.params = nnx.data(jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param))))

  def update(self, model: nnx.Module) -> None:
    current = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    self.params = jax.tree.map(lambda e, p: self.decay * e + (1 - self.decay) * p,
                               self.params, current)


def _warm_start(model: nnx.Module, folder: str) -> None:
  """Copies the weights of the exported model in `folder` (same architecture) into `model`."""
  source = load_pretrained(folder, "float32")
  if source.config != model.config:
    raise SystemExit(f"error: init_from {folder} has another architecture than config.model")
  nnx.update(model, nnx.state(source, nnx.Param))
  print(f"initialised from {folder}")


def _prefetched(batches: Iterator, depth: int = 4) -> Iterator:
  """`batches` in the same order, drawn up to `depth` ahead on one host thread."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = [pool.submit(next, batches) for _ in range(depth)]
    while True:
      batch = ahead.pop(0).result()
      ahead.append(pool.submit(next, batches))
      yield batch


def _export(model: nnx.Module, ema: EMA, cfg, conditions: np.ndarray) -> None:
  """Writes the model (its EMA weights when `ema_decay` > 0) to `cfg.output`, the model untouched."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if cfg.ema_decay > 0:
    nnx.replace_by_pure_dict(params, ema.params)
  exported = nnx.merge(graphdef, params, rest)
  with atomic_output_dir(cfg.output, overwrite=True) as tmp:
    save_diffusers(exported, tmp)
    save_conditions(tmp, conditions, [procedural.class_name(i)
                                      for i in range(procedural.NUM_CLASSES)])


def main(_) -> int:
  train(_CONFIG.value)
  return 0


def train(cfg) -> None:
  """Runs (or resumes) the training `cfg` describes (configs/train_embedded.py)."""
  if not 0 <= cfg.warmup_steps < cfg.num_steps:
    raise SystemExit(f"error: warmup_steps={cfg.warmup_steps} must be in [0, num_steps="
                     f"{cfg.num_steps})")
  model_cfg = CogVideoXConfig.from_dict(dict(cfg.model))
  model = CogVideoXTransformer3D(model_cfg, rngs=nnx.Rngs(cfg.seed))
  if cfg.init_from:
    _warm_start(model, cfg.init_from)
  lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.num_steps,
                                          cfg.learning_rate * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(lr, weight_decay=cfg.weight_decay))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  ema = EMA(model, cfg.ema_decay)

  conditions = procedural.class_embeddings(procedural.NUM_CLASSES, cfg.data.text_len,
                                           model_cfg.text_embed_dim, seed=cfg.seed)
  cond_table = jnp.asarray(conditions)
  schedule = make_schedule()
  step_fn = _train_step_fn(schedule, schedule.num_train_timesteps, cond_table[-1],
                           cfg.cond_dropout)

  workdir = os.path.abspath(cfg.workdir)
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=1))
  state = nnx.state((model, optimizer, ema))
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    restored = manager.restore(start, args=ocp.args.StandardRestore(nnx.to_pure_dict(state)))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update((model, optimizer, ema), state)
    print(f"resumed from step {start}")

  data = _prefetched(procedural.batch_iterator(cfg.batch_size, seed=cfg.seed + start,
                                               num_frames=cfg.data.num_frames,
                                               height=cfg.data.height, width=cfg.data.width))
  key = jax.random.key(cfg.seed)
  t0, losses = time.perf_counter(), []
  step = start
  while step < cfg.num_steps:
    videos, labels = next(data)
    # Kept on device and read at the log: a read per step would stall an accelerator.
    losses.append(step_fn(model, optimizer, ema, jnp.asarray(videos), cond_table[labels],
                          jax.random.fold_in(key, step)))
    step += 1
    minutes = (time.perf_counter() - t0) / 60
    out_of_time = 0 < cfg.max_minutes <= minutes
    if step % cfg.log_every == 0 or out_of_time:
      rate = (step - start) / (minutes * 60)
      print(f"step {step}/{cfg.num_steps} loss {np.mean(jax.device_get(losses)):.4f} "
            f"({rate:.2f} steps/s, {(cfg.num_steps - step) / rate / 60:.0f} min left)",
            flush=True)
      losses = []
    if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or out_of_time:
      manager.save(step, args=ocp.args.StandardSave(
          nnx.to_pure_dict(nnx.state((model, optimizer, ema)))))
    if out_of_time:
      break
  manager.wait_until_finished()

  _export(model, ema, cfg, conditions)
  minutes = (time.perf_counter() - t0) / 60
  if step < cfg.num_steps:
    print(f"stopped at step {step}/{cfg.num_steps} after max_minutes={cfg.max_minutes} "
          f"({minutes:.1f} min); wrote what it has to {cfg.output}; the same command resumes")
  else:
    print(f"wrote {cfg.output} after {cfg.num_steps} steps ({minutes:.1f} min this run)")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(app.run(main))
