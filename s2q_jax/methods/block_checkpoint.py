"""Block-wise calibration's checkpoint: what each finished block learned, one file per block.

`<workdir>/calibration/block_NNN.npz` holds block NNN's quantization state
(learned parameters and integer codes, `QuantParam` and `Codes` Variables),
written once when the block is done. Saving each block's own state, rather
than the whole model's after every block, keeps the writes linear in the
model's size (CogVideoX-5B: 42 blocks). Files are written atomically, so a
run killed mid-write leaves the previous blocks intact, and the resume
point is the number of consecutive files from block 0.

In a multi-process run only the writer (process 0) touches the files; the
others receive the resume point and the restored state from it
(`multihost`), so the workdir need not be shared.
"""
from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from s2q_jax import multihost, outputs
from s2q_jax.errors import UserError
from s2q_jax.quant.qlinear import Codes, QuantParam

_FILE = re.compile(r"^block_(\d{3,})\.npz$")


def _state(block: nnx.Module) -> nnx.State:
  return nnx.state(block, nnx.Any(QuantParam, Codes))


def _flat(state: nnx.State) -> dict[str, tuple]:
  """{'attn1/to_q/clip': its key path} of a block's state."""
  return {"/".join(map(str, path)): path
          for path in traverse_util.flatten_dict(nnx.to_pure_dict(state))}


class BlockCheckpoint:
  """The calibration checkpoint in `folder` (created on the first save)."""

  def __init__(self, folder: str):
    self.folder = os.path.abspath(folder)

  def path(self, block_index: int) -> str:
    return os.path.join(self.folder, f"block_{block_index:03d}.npz")

  def blocks_done(self) -> int:
    """How many blocks, from the first, are saved (the writer's count, on every process)."""
    def count() -> int:
      if not os.path.isdir(self.folder):
        return 0
      saved = {int(m.group(1)) for name in os.listdir(self.folder) if (m := _FILE.match(name))}
      n = 0
      while n in saved:
        n += 1
      return n
    return multihost.share_json(multihost.on_writer(count))

  def save(self, block_index: int, block: nnx.Module) -> None:
    """Writes the block's state (writer only; a failed write stops every process)."""
    def write() -> None:
      flat = traverse_util.flatten_dict(nnx.to_pure_dict(_state(block)))
      arrays = {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}
      outputs.write_with(self.path(block_index), lambda tmp: _savez(tmp, arrays))
    multihost.on_writer(write)

  def restore(self, block_index: int, block: nnx.Module) -> None:
    """Loads the block's saved state into `block`, whose structure must already match it."""
    state = _state(block)
    keys = _flat(state)

    def read() -> dict[str, np.ndarray]:
      path = self.path(block_index)
      try:
        with np.load(path) as f:
          arrays = {k: f[k] for k in f.files}
      except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}): delete {self.folder} to calibrate "
                        "from the first block again") from None
      if set(arrays) != set(keys):
        missing = sorted(set(keys) ^ set(arrays))[:3]
        raise UserError(f"{path} does not match the block's layers ({', '.join(missing)}): "
                        f"delete {self.folder} to calibrate from the first block again")
      return arrays

    arrays = multihost.share_arrays(multihost.on_writer(read))
    nested = traverse_util.unflatten_dict({keys[k]: jnp.asarray(v) for k, v in arrays.items()})
    nnx.replace_by_pure_dict(state, nested)
    nnx.update(block, state)


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
  with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
    np.savez(f, **arrays)
