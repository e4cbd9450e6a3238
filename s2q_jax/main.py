"""Quantize a video DiT, generate FP and quantized videos, and report.

  python -m s2q_jax.main --config configs/w4a6.py [--config.method=rtn] [--config.workdir=DIR]

Exit codes: 0 done; 1 the job stopped on bad input, a workdir holding other
settings, non-finite values or an I/O failure (one `error:` line); 2 a bad
command line or config file.
"""
import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from s2q_jax import job
from s2q_jax.errors import UserError, show_warning

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file(argv: list[str]) -> str | None:
  """The --config file named on the command line (without a `:override` suffix), if any."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return value.split(":", 1)[0]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with bad configs and overrides reported in one line."""
  path = _config_file(argv)
  # Checked here because, with overrides, absl only reports "Failed loading config
  # file config_config" without the path.
  if path is not None and not os.path.isfile(path):
    configs = os.path.join(os.path.dirname(_HERE), "configs")
    hint = f" (the shipped configs are in {configs}/)" if os.path.isdir(configs) else ""
    _fail(f"cannot load the --config file {path}: no such file{hint}")
  if any(arg.startswith("--config.calib.distributed") for arg in argv[1:]):
    _fail(job.REPLACED_DISTRIBUTED)
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _fail(f"unknown config key {e}: run with --config=FILE and check the names in that file")
  except SyntaxError as e:
    _fail(f"cannot load the --config file: {e.msg} ({e.filename}, line {e.lineno})")
  except Exception as e:  # pylint: disable=broad-except
    # Anything raised while parsing is a bad command line or config file.
    _fail(f"bad command line: {str(e).strip().splitlines()[0]}")
  if _CONFIG.value is None:
    _fail("pass a config, e.g. --config configs/w4a6.py")
  try:
    _CONFIG.value.keys()  # a config file that failed to load raises only when touched
  except (OSError, SyntaxError, AttributeError) as e:
    reason = str(e).strip().splitlines()[-1].strip()
    _fail(f"cannot load the --config file: {reason}")
  return rest


def main(argv) -> int:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; options are --config and --config.KEY=VALUE")
  logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
  warnings.showwarning = show_warning
  try:
    job.run(_CONFIG.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
