"""Parameter sharding over a `model` mesh axis (FSDP-style) and the device mesh itself.

The job's devices form a 2-D mesh ("data", "model"). Each large parameter is
stored split along one of its dimensions over "model" and replicated over
"data"; a device thus holds about 1/model of the model. The computation
gathers what it needs where it needs it: a calibration step gathers its one
block's parameters (`gather`), and so does generation, block by block as the
step reaches it (`generation.step_model`).

The rule (`spec`): an array of at least `MIN_SHARDED_SIZE` elements is split
along its largest dimension that the model-axis size divides (on a tie, the
later one: a Linear kernel (in, out) of a square layer is split by output
channel, in line with its per-output-channel scales and clipping). An array
no dimension of which divides, or a small one (norm scales, biases of narrow
layers, scalars), is replicated: gathering it would cost a collective for a
few kilobytes. The rule depends on shapes only, so optimizer moments follow
their parameters without being told.

A mesh without a "model" axis (the 1-D ("data",) meshes of older callers)
counts as model size 1: everything replicated.
"""
from __future__ import annotations

import functools
import math
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from s2q_jax.errors import UserError

T = TypeVar("T")
DATA, MODEL = "data", "model"
# Below this many elements an array stays replicated (4 KiB in float32).
MIN_SHARDED_SIZE = 1024


def check_model_size(model) -> None:
  if isinstance(model, bool) or not isinstance(model, int) or model < 1:
    raise UserError(f"mesh.model={model!r} must be a positive integer (1: no parameter "
                    "sharding)")


def make_mesh(model: int, devices: list | None = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all), data = len(devices) / model."""
  devices = jax.devices() if devices is None else list(devices)
  check_model_size(model)
  if len(devices) % model:
    raise UserError(f"mesh.model={model} does not divide the {len(devices)} devices: set "
                    f"--config.mesh.model to a divisor of {len(devices)}")
  # Auto axes: XLA's partitioner places the gathers; with Explicit ones (make_mesh's default)
  # every op on a sharded parameter would have to say how its result is laid out.
  return jax.make_mesh((len(devices) // model, model), (DATA, MODEL),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def model_size(mesh: Mesh) -> int:
  return dict(mesh.shape).get(MODEL, 1)


def data_size(mesh: Mesh) -> int:
  return dict(mesh.shape).get(DATA, 1)


def spec(shape: tuple[int, ...], model: int) -> P:
  """How an array of `shape` is laid out over a model axis of size `model` (module doc)."""
  if model == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], -d)):
    if shape[dim] % model == 0:
      return P(*(MODEL if d == dim else None for d in range(len(shape))))
  return P()


def shardings(tree: T, mesh: Mesh) -> T:
  """A NamedSharding per array of `tree`, by `spec`."""
  model = model_size(mesh)
  return jax.tree.map(lambda x: NamedSharding(mesh, spec(np.shape(x), model)), tree)


def place(tree: T, mesh: Mesh) -> T:
  """`tree`'s arrays (on one process) laid out over `mesh` by `spec`."""
  return jax.device_put(tree, shardings(tree, mesh))


def constrain(tree: T, mesh: Mesh) -> T:
  """Inside a jitted function: `tree`'s arrays laid out by `spec` (keeps outputs sharded)."""
  return jax.lax.with_sharding_constraint(tree, shardings(tree, mesh))


def gather(tree: T, mesh: Mesh) -> T:
  """Inside a jitted function: `tree`'s arrays whole on every device (one all-gather each)."""
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def replicate(tree: T, mesh: Mesh) -> T:
  """Sharded global arrays as replicated ones (e.g. before `multihost.local`)."""
  return _replicator(mesh)(tree)


@functools.lru_cache(maxsize=8)
def _replicator(mesh: Mesh):
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))


def per_device_bytes(tree) -> int:
  """Bytes of `tree`'s arrays that the most loaded device holds."""
  totals: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return max(totals.values(), default=0)
