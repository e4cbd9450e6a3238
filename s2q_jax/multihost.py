"""Runs over several processes (TPU pod hosts, GPU hosts, or CPU processes in tests).

Every process runs the same command. Their devices form one mesh, over which
calibration shards its samples; everything else each process computes by
itself on its first local device, with the same result. Process 0, the
*writer*, is the only one that reads or writes the workdir and its caches;
what the others need from there (whether a cache holds, a cached pool, where
to resume and the state calibrated so far) it broadcasts. So the workdir
need not be on a filesystem every host sees, and no two processes ever
write one file.

A user error on the writer alone (a workdir holding another run, a failed
write) is broadcast too, so that every process stops with the same message
instead of waiting in the next collective for a process that has gone.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from s2q_jax.errors import UserError

T = TypeVar("T")
AUTO = "auto"  # mesh.coordinator: let JAX discover the cluster (TPU pods, Slurm, Open MPI)
# Broadcasts go through device memory: large arrays travel in pieces of at most this size.
_CHUNK_BYTES = 64 * 2**20

_started_with: tuple | None = None


def check_config(mesh_cfg) -> tuple | None:
  """(coordinator, num_processes, process_id) to start the process group with, or None."""
  coordinator = mesh_cfg.coordinator or ""
  n, pid = mesh_cfg.num_processes, mesh_cfg.process_id
  if not coordinator:
    if n is not None or pid is not None:
      raise UserError("mesh.num_processes / mesh.process_id need mesh.coordinator: set it to "
                      "process 0's host:port (or 'auto' on a TPU pod, Slurm or Open MPI)")
    return None
  if coordinator != AUTO:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise UserError(f"mesh.coordinator={coordinator!r}: use host:port of process 0, e.g. "
                      "10.0.0.2:1234, or 'auto' to let JAX discover the cluster")
    if n is None or pid is None:
      raise UserError(f"mesh.coordinator={coordinator!r} needs mesh.num_processes and "
                      "mesh.process_id too (0 on the coordinator's host)")
  if n is not None and n < 1:
    raise UserError(f"mesh.num_processes={n} must be at least 1")
  if pid is not None and not 0 <= pid < (n if n is not None else pid + 1):
    raise UserError(f"mesh.process_id={pid} must be in 0 … mesh.num_processes − 1 = {n - 1}")
  return (None if coordinator == AUTO else coordinator, n, pid)


def initialize(mesh_cfg) -> None:
  """Joins the process group `mesh_cfg` describes (no-op without a coordinator).

  Must run before anything computes with JAX. Idempotent for the same settings,
  so several jobs can run in one process (as `compare` does).
  """
  global _started_with
  args = check_config(mesh_cfg)
  if args is None or args == _started_with:
    return
  if _started_with is not None:
    raise UserError(f"this process already joined a process group as {_started_with}; "
                    f"it cannot join another ({args})")
  coordinator, n, pid = args
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n,
                               process_id=pid)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"cannot join the process group (mesh.coordinator={mesh_cfg.coordinator!r}): "
                    f"{first}") from None
  _started_with = args


def is_writer() -> bool:
  return jax.process_index() == 0


def on_writer(fn: Callable[[], T]) -> T | None:
  """fn() on the writer (None elsewhere); whatever it raises stops every process.

  The writer re-raises the exception itself; the others raise a UserError
  with its message, so that all of them end with one line, not a hang.
  """
  if jax.process_count() == 1:
    return fn()
  failure, result = None, None
  if is_writer():
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      failure = e
  message = share_json(None if failure is None else str(failure) or type(failure).__name__)
  if failure is not None:
    raise failure
  if message is not None:
    raise UserError(f"process 0 stopped: {message}")
  return result


def share_json(value: Any) -> Any:
  """The writer's JSON-able `value` on every process."""
  if jax.process_count() == 1:
    return value
  data = None
  if is_writer():
    text = json.dumps(value).encode()
    # Padded with spaces (which JSON ignores) to a power of two: few sizes, few compiles.
    data = np.frombuffer(text.ljust(max(256, 1 << (len(text) - 1).bit_length())), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
  buffer = data if data is not None else np.zeros(size, np.uint8)
  return json.loads(_broadcast(buffer).tobytes().decode())


def share_arrays(arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
  """The writer's {name: array} (or None) on every process; the others' argument is ignored."""
  if jax.process_count() == 1:
    return None if arrays is None else dict(arrays)
  spec = share_json(None if not is_writer() or arrays is None else
                    {k: [list(np.shape(v)), np.asarray(v).dtype.str] for k, v in arrays.items()})
  if spec is None:
    return None
  out = {}
  for name, (shape, dtype) in spec.items():
    local = np.asarray(arrays[name]) if is_writer() else np.zeros(shape, dtype)
    out[name] = _broadcast(local)
  return out


def _broadcast(array: np.ndarray) -> np.ndarray:
  """The writer's `array` (same shape and dtype on every process), bit for bit.

  Sent as bytes: a float64 or int64 array would otherwise pass through JAX's
  default 32-bit types and come back rounded.
  """
  data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
  pieces = [multihost_utils.broadcast_one_to_all(data[i:i + _CHUNK_BYTES])
            for i in range(0, data.size, _CHUNK_BYTES)]
  out = np.concatenate(pieces) if pieces else data.copy()
  return out.view(array.dtype).reshape(array.shape)


def share_of(n: int) -> tuple[int, int]:
  """[lo, hi): this process's contiguous share of n items (ceil(n / processes) each)."""
  size = -(-n // jax.process_count())
  lo = min(jax.process_index() * size, n)
  return lo, min(lo + size, n)


def gather(part: np.ndarray, n: int) -> np.ndarray:
  """The n items whose `share_of` each process holds in `part`, on every process."""
  if jax.process_count() == 1:
    return part
  size = -(-n // jax.process_count())
  padded = np.zeros((size,) + part.shape[1:], part.dtype)
  padded[:len(part)] = part
  gathered = multihost_utils.process_allgather(padded)  # (processes, size, ...)
  return np.asarray(gathered).reshape((-1,) + part.shape[1:])[:n]


def put(tree: T, sharding: jax.sharding.Sharding | Any) -> T:
  """`tree`'s values, the same on every process, as global arrays laid out by `sharding`.

  `sharding` is one Sharding for every array or a tree of them matching `tree`.
  Each process fills its own devices' shards from its own copy: nothing is sent
  between processes.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x, s):
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, s, lambda index: value[index])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding), tree)
  return jax.tree.map(one, tree, sharding)


def local(tree: T) -> T:
  """Fully replicated global arrays as arrays on this process's first device."""
  device = jax.local_devices()[0]

  def one(x):
    if not x.is_fully_replicated:
      raise ValueError(f"multihost.local needs replicated arrays, got {x.sharding}")
    return jax.device_put(x.addressable_data(0), device)
  return jax.tree.map(one, tree)
