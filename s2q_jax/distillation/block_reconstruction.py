"""Block-wise reconstruction: train one quantized block to match its full-precision twin.

The learnable state is chosen by Variable type, one AdamW + cosine schedule
per type: S²Q-VDiT trains each `QuantLinear`'s weight and activation clipping
(`WeightClip`, `ActClip`), smoothing (`SmoothScale`) and Kronecker input
transform (`KroneckerFactor`), Q-VDiT its estimator branch; activation
quantization stays on. After every step, values of a type with `bounds` are
projected back into them (a clipping factor that stepped past 1 would
otherwise get no gradient again). The loss is the token-weighted MSE unless a method
passes its own. Calibration samples are
sharded over every device of the mesh: each device computes gradients on its
shard and `pmean` averages them, so any device count gives the same update
for the same global batch. On a ("data", "model") mesh the block's
parameters, frozen and learned, and the optimizer state are stored sharded
over "model" (`s2q_jax.sharding`); each step gathers the block whole for its
forward and backward pass and updates the shards (FSDP, with the block as
the unit of gathering; the samples are split over "model" too, so no
device repeats another's work).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from s2q_jax import multihost, sharding
from s2q_jax.distillation.token_importance import weighted_token_mse
from s2q_jax.quant.qlinear import SmoothScale, WeightClip, project


@dataclasses.dataclass
class BlockData:
  """One block's training set; every array has the N samples first (`models.interface`)."""
  stream: tuple[np.ndarray, ...]  # the quantized model's input stream to this block
  context: tuple[np.ndarray, ...]  # what the block reads besides (conditioning)
  target: tuple[np.ndarray, ...]  # full-precision block output on full-precision inputs
  weights: np.ndarray  # (N, T) token weights λ over the stream's concatenated tokens


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


LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (target, output, λ) → loss


@functools.lru_cache(maxsize=4)
def _train_step(graphdef, groups: tuple[tuple[type, float], ...], total_steps: int, loss: LossFn,
                mesh: jax.sharding.Mesh):
  """(optimizers, jitted step) for blocks of one structure.

  Cached so that every block of a model (the same graphdef) reuses one
  compiled step instead of compiling its forward and backward pass again.
  """
  txs = tuple(_optimizer(lr, total_steps) for _, lr in groups)

  def loss_fn(params, rest, extras, stream, context, target, w):
    block = nnx.merge(graphdef, *params, rest)
    y = jnp.concatenate(block.calibration_call(stream, context, extras), axis=1)
    return loss(jnp.concatenate(target, axis=1), y, w)

  devices = mesh.axis_names  # the samples are split over all of them

  def local_grads(params, rest, extras, *batch):
    value, grads = jax.value_and_grad(loss_fn)(params, rest, extras, *batch)
    return jax.lax.pmean(value, devices), jax.lax.pmean(grads, devices)

  # The batch (stream, context, target, weights) is split over the devices.
  sharded_grads = jax.shard_map(local_grads, mesh=mesh,
                                in_specs=(P(), P(), P()) + (P(devices),) * 4,
                                out_specs=(P(), P()), check_vma=False)

  @jax.jit
  def step(params, rest, opt_state, extras, *batch):
    whole_params, whole_rest = sharding.gather((params, rest), mesh)
    value, grads = sharded_grads(whole_params, whole_rest, extras, *batch)
    new_params, new_state = [], []
    for (kind, _), tx, p, g, s in zip(groups, txs, params, grads, opt_state):
      update, s = tx.update(g, s, p)
      new_params.append(jax.tree.map(lambda v: project(v, kind), optax.apply_updates(p, update)))
      new_state.append(s)
    # Laid out as they came in: the same input shardings at every call, one compilation.
    return sharding.constrain((tuple(new_params), tuple(new_state)), mesh) + (value,)

  return txs, step


def train_block(block: nnx.Module, data: BlockData, extras, cfg: TrainConfig,
                mesh: jax.sharding.Mesh, groups: dict[type, float] | None = None,
                loss: LossFn = weighted_token_mse,
                on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
  """Optimises `block`'s learnable Variables in place; returns the mean loss per epoch.

  `groups` maps Variable types to learning rates (default: clipping at
  `cfg.lr_clip`, smoothing at `cfg.lr_smooth`). The block is a
  `models.interface.CalibrationBlock`; `extras` what its calls read besides the
  data (rotary tables).
  The block and `data` are the same on every process; the mesh may span
  processes, and the learned values come back on this process's first device,
  where the rest of calibration runs. `on_epoch(epoch, mean loss)` follows
  each epoch (progress reports).
  """
  groups = groups or {WeightClip: cfg.lr_clip, SmoothScale: cfg.lr_smooth}
  n = len(data.weights)
  n_dev = mesh.devices.size
  batch = max(n_dev, (min(cfg.batch_size, n) // n_dev) * n_dev)
  steps_per_epoch = max(n // batch, 1)
  graphdef, *params, rest = nnx.split(block, *groups, ...)
  params = tuple(params)
  txs, step = _train_step(graphdef, tuple(groups.items()), cfg.epochs * steps_per_epoch, loss,
                          mesh)
  opt_state = tuple(tx.init(p) for tx, p in zip(txs, params))
  # Laid out as the step's outputs are: the same input shardings at every call.
  state = (params, rest, opt_state)
  params, rest, opt_state = multihost.put(state, sharding.shardings(state, mesh))
  extras = multihost.put(extras, NamedSharding(mesh, P()))

  arrays = (tuple(data.stream), tuple(data.context), tuple(data.target), data.weights)
  split = NamedSharding(mesh, P(mesh.axis_names))
  rng = np.random.default_rng(cfg.seed)
  history = []
  for epoch in range(cfg.epochs):
    order = rng.permutation(n)
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      shard = jax.tree.map(lambda a: multihost.put(np.asarray(a[idx]), split), arrays)
      params, opt_state, value = step(params, rest, opt_state, extras, *shard)
      losses.append(value)  # read at the epoch's end: a read per step would stall dispatch
    history.append(float(np.mean(jax.device_get(losses))))
    if not np.isfinite(history[-1]):
      nnx.update(block, *multihost.local(sharding.replicate(params, mesh)))
      raise NonFiniteLoss(f"loss became {history[-1]}")
    if on_epoch is not None:
      on_epoch(epoch, history[-1])
  nnx.update(block, *multihost.local(sharding.replicate(params, mesh)))
  return history
