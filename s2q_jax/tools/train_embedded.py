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
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app
from flax import nnx
from ml_collections import config_flags

from conversion.flax_to_diffusers import save_diffusers
from conversion.output_dir import atomic_output_dir
from s2q_jax.data import procedural
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D, load_pretrained
from s2q_jax.conditions import save_conditions
from s2q_jax.sampling import add_noise, make_schedule, v_target

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_embedded.py")


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


def main(_) -> int:
  cfg = _CONFIG.value
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

  data = procedural.batch_iterator(cfg.batch_size, seed=cfg.seed + start,
                                   num_frames=cfg.data.num_frames, height=cfg.data.height,
                                   width=cfg.data.width)
  key = jax.random.key(cfg.seed)
  t0, losses = time.perf_counter(), []
  for step in range(start, cfg.num_steps):
    videos, labels = next(data)
    loss = step_fn(model, optimizer, ema, jnp.asarray(videos), cond_table[labels],
                   jax.random.fold_in(key, step))
    losses.append(float(loss))
    if (step + 1) % cfg.log_every == 0:
      rate = (step + 1 - start) / (time.perf_counter() - t0)
      eta = (cfg.num_steps - step - 1) / rate
      print(f"step {step + 1}/{cfg.num_steps} loss {np.mean(losses):.4f} "
            f"({rate:.2f} steps/s, {eta / 60:.0f} min left)", flush=True)
      losses = []
    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.num_steps:
      manager.save(step + 1, args=ocp.args.StandardSave(
          nnx.to_pure_dict(nnx.state((model, optimizer, ema)))))
  manager.wait_until_finished()

  if cfg.ema_decay > 0:
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, ema.params)
    nnx.update(model, params)
  with atomic_output_dir(cfg.output, overwrite=True) as tmp:
    save_diffusers(model, tmp)
    save_conditions(tmp, conditions, [procedural.class_name(i)
                                      for i in range(procedural.NUM_CLASSES)])
  print(f"wrote {cfg.output} after {cfg.num_steps} steps "
        f"({(time.perf_counter() - t0) / 60:.1f} min this run)")
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
