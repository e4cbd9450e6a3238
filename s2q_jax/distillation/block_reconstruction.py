"""Block-wise reconstruction: train one quantized block to match its full-precision twin.

The learnable state is each `QuantLinear`'s clipping (`WeightClip`) and
smoothing (`SmoothScale`), two parameter groups with their own AdamW +
cosine schedules; activation quantization stays on. Calibration samples are
sharded over a `data` mesh axis: each device computes gradients on its
shard and `pmean` averages them, so any device count gives the same update
for the same global batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from s2q_jax.distillation.token_importance import weighted_token_mse
from s2q_jax.quant.qlinear import SmoothScale, WeightClip


@dataclasses.dataclass
class BlockData:
  video: np.ndarray  # (N, n_video, D): the quantized model's input to this block
  text: np.ndarray  # (N, n_text, D)
  temb: np.ndarray  # (N, D_t)
  target_video: np.ndarray  # full-precision block output on full-precision inputs
  target_text: np.ndarray
  weights: np.ndarray  # (N, n_text + n_video) token weights λ


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  epochs: int = 15
  batch_size: int = 4
  lr_clip: float = 5e-2
  lr_smooth: float = 5e-3
  seed: int = 0


class NonFiniteLoss(FloatingPointError):
  pass


def _optimizer(lr: float, total_steps: int) -> optax.GradientTransformation:
  return optax.adamw(optax.cosine_decay_schedule(lr, max(total_steps, 1)), weight_decay=0.0)


def train_block(block: nnx.Module, data: BlockData, rotary, cfg: TrainConfig,
                mesh: jax.sharding.Mesh) -> list[float]:
  """Optimises `block`'s clipping and smoothing in place; returns the mean loss per epoch."""
  n = len(data.video)
  n_dev = mesh.devices.size
  batch = max(n_dev, (min(cfg.batch_size, n) // n_dev) * n_dev)
  steps_per_epoch = max(n // batch, 1)
  graphdef, clip, smooth, rest = nnx.split(block, WeightClip, SmoothScale, ...)
  total = cfg.epochs * steps_per_epoch
  tx_clip, tx_smooth = _optimizer(cfg.lr_clip, total), _optimizer(cfg.lr_smooth, total)
  opt_state = (tx_clip.init(clip), tx_smooth.init(smooth))

  def loss_fn(clip, smooth, rest, video, text, temb, tv, tt, w):
    model = nnx.merge(graphdef, clip, smooth, rest)
    out_v, out_t = model(video, text, temb, rotary)
    y = jnp.concatenate([out_t, out_v], axis=1)
    return weighted_token_mse(jnp.concatenate([tt, tv], axis=1), y, w)

  def local_grads(clip, smooth, rest, *batch_arrays):
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(clip, smooth, rest, *batch_arrays)
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grads, "data")

  sharded_grads = jax.shard_map(local_grads, mesh=mesh,
                                in_specs=(P(), P(), P()) + (P("data"),) * 6,
                                out_specs=(P(), P()), check_vma=False)

  @jax.jit
  def step(clip, smooth, rest, opt_state, *batch_arrays):
    loss, (g_clip, g_smooth) = sharded_grads(clip, smooth, rest, *batch_arrays)
    u_clip, s_clip = tx_clip.update(g_clip, opt_state[0], clip)
    u_smooth, s_smooth = tx_smooth.update(g_smooth, opt_state[1], smooth)
    return (optax.apply_updates(clip, u_clip), optax.apply_updates(smooth, u_smooth),
            (s_clip, s_smooth), loss)

  arrays = (data.video, data.text, data.temb, data.target_video, data.target_text, data.weights)
  sharding = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(cfg.seed)
  history = []
  for _ in range(cfg.epochs):
    order = rng.permutation(n)
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      shard = [jax.device_put(jnp.asarray(a[idx]), sharding) for a in arrays]
      clip, smooth, opt_state, loss = step(clip, smooth, rest, opt_state, *shard)
      losses.append(float(loss))
    history.append(float(np.mean(losses)))
    if not np.isfinite(history[-1]):
      nnx.update(block, clip, smooth)
      raise NonFiniteLoss(f"loss became {history[-1]}")
  nnx.update(block, clip, smooth)
  return history
