"""Quantize a video DiT, generate FP and quantized videos, and report.

  python -m s2q_jax.main --config configs/w4a6.py [--config.method=rtn] [--config.workdir=DIR]
"""
import sys

from absl import app, logging
from ml_collections import config_flags

from s2q_jax import job
from s2q_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; options are --config and --config.KEY=VALUE",
          file=sys.stderr)
    return 2
  if _CONFIG.value is None:
    print("error: pass a config, e.g. --config configs/w4a6.py", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
  try:
    job.run(_CONFIG.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
