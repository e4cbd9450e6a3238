"""Checks of the main job's config that end it with one line saying what to set."""
from __future__ import annotations

import jax
from ml_collections import ConfigDict

from pallas_kernels import BACKENDS
from s2q_jax import multihost, sharding
from s2q_jax.errors import UserError
from s2q_jax.methods import CALIBRATORS, METHODS


def validate(cfg: ConfigDict) -> None:
  """The checks that need no device (run before the process group is joined)."""
  if cfg.method not in METHODS:
    raise UserError(f"unknown method {cfg.method!r}: set --config.method to one of "
                    f"{', '.join(METHODS)}")
  for name in ("w_bits", "a_bits"):
    bits = cfg.quant[name]
    if not isinstance(bits, int) or not 2 <= bits <= 8:
      raise UserError(f"quant.{name}={bits!r} is outside 2–8: set --config.quant.{name} "
                      "to an integer from 2 to 8")
  for name in ("num_videos", "frames", "height", "width"):
    if cfg.eval[name] < 1:
      raise UserError(f"eval.{name} must be at least 1")
  if cfg.sampler.num_steps < 1:
    raise UserError("sampler.num_steps must be at least 1")
  if "distributed" in cfg.calib:
    raise UserError(REPLACED_DISTRIBUTED)
  multihost.check_config(cfg.mesh)
  sharding.check_model_size(cfg.mesh.model)
  if cfg.inference.backend not in ("",) + BACKENDS:
    raise UserError(f"inference.backend={cfg.inference.backend!r}: use '' (fake-quant) or one "
                    f"of {', '.join(BACKENDS)}")


REPLACED_DISTRIBUTED = (
    "calib.distributed was replaced by mesh.coordinator: on a TPU pod (or Slurm, Open MPI) "
    "pass --config.mesh.coordinator=auto; elsewhere --config.mesh.coordinator=HOST:PORT "
    "--config.mesh.num_processes=N --config.mesh.process_id=I on each process")


def validate_devices(cfg: ConfigDict) -> None:
  """The checks that need the devices: only known once the process group is joined."""
  if CALIBRATORS[cfg.method] and cfg.calib.num_samples % jax.device_count():
    raise UserError(f"calib.num_samples={cfg.calib.num_samples} must be a multiple of the "
                    f"{jax.device_count()} devices it is sharded over")
  sharding.make_mesh(cfg.mesh.model)  # the model axis divides the devices
  if jax.local_device_count() % cfg.mesh.model:
    raise UserError(f"mesh.model={cfg.mesh.model} does not divide this process's "
                    f"{jax.local_device_count()} devices, over which it generates its videos: "
                    "set --config.mesh.model to a divisor of the devices per process")
