"""Issue #15: I/O failures and bad files end with one line naming the path, leaving nothing trusted.

Full disks and read-only filesystems are simulated by raising the OSError a
real one gives (tests run as root in CI, where chmod cannot make a folder
read-only).
"""
import builtins
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from integrity_helpers import model_copy, tiny_config
from s2q_jax import deploy, job
from s2q_jax.data import gif
from s2q_jax.errors import UserError
from s2q_jax.evaluation import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "s2q_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _leftovers(folder):
  return [os.path.join(r, n) for r, _, files in os.walk(folder) for n in files if "partial" in n]


def test_disk_full_while_writing_a_gif(tmp_path, monkeypatch):
  def half_written(path, frames, **kwargs):
    with open(path, "wb") as f:
      f.write(b"GIF89a")  # what a full disk leaves: the start of the file
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
  monkeypatch.setattr(gif, "save_gif", half_written)
  workdir = tmp_path / "w"
  with pytest.raises(UserError) as e:
    job.run(tiny_config(workdir, **{"eval.num_videos": 1}))
  assert str(e.value) == (f"cannot write {workdir}/videos/00_red_square_moving_right.gif: "
                          "No space left on device")
  assert os.listdir(workdir / "videos") == [] and not (workdir / "report.json").exists()


def test_read_only_while_exporting_is_one_line(tmp_path, monkeypatch):
  def read_only(model, folder):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(folder, "config.json"))
  monkeypatch.setattr(deploy, "export_quantized", read_only)
  workdir = tmp_path / "w"
  with pytest.raises(UserError, match=r"config\.json: Read-only file system "
                                      r"\(while exporting the quantized checkpoint\)"):
    job.run(tiny_config(workdir, **{"eval.num_videos": 1}))
  assert not (workdir / "quantized_model").exists() and not _leftovers(workdir)


def test_read_only_fp_video_cache_leaves_no_file(tmp_path, monkeypatch):
  real_savez = np.savez

  def read_only(file, **arrays):
    real_savez(file, **arrays)  # written in full, then the rename target vanishes read-only
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.setattr(np, "savez", read_only)
  cache = tmp_path / "fp_videos.npz"
  with pytest.raises(UserError) as e:
    job.run(tiny_config(tmp_path / "w", **{"eval.fp_videos_path": str(cache),
                                           "eval.num_videos": 1}))
  assert str(e.value) == f"cannot write {cache}: Read-only file system"
  assert os.listdir(tmp_path) == ["w"] and not _leftovers(tmp_path)


def test_disk_full_while_writing_the_report_keeps_no_report(tmp_path, monkeypatch):
  real_open = builtins.open

  def full_disk(file, mode="r", *args, **kwargs):
    if "w" in mode and "report" in os.path.basename(str(file)) and ".json" in str(file):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
    return real_open(file, mode, *args, **kwargs)
  monkeypatch.setattr(builtins, "open", full_disk)
  report = {"method": "rtn", "w_bits": 4, "a_bits": 6, "model": "m",
            "metrics": {"psnr": 1.0, "ssim": 1.0, "temporal_consistency": 1.0},
            "size": {"fp_bytes": 2, "quant_bytes": 1, "compression": 2.0}, "timing": {"load": 1.0},
            "layers": {"quantized": [], "full_precision": []},
            "eval": {"num_videos": 1, "num_steps": 1, "guidance_scale": 1.0}, "videos": []}
  with pytest.raises(UserError, match=f"cannot write {tmp_path}/report.json: No space left"):
    report_lib.write_report(str(tmp_path), report)
  assert sorted(os.listdir(tmp_path)) == ["report.md"]  # no report.json marks it finished


def test_bad_model_leaves_no_workdir(tmp_path):
  workdir = tmp_path / "new" / "deeper"
  with pytest.raises(UserError, match="is not a supported model"):
    job.run(tiny_config(workdir, **{"model.path": str(tmp_path / "nonexistent")}))
  assert os.listdir(tmp_path) == []


def test_corrupt_conditions_file_is_named(tmp_path):
  folder = model_copy(tmp_path / "m")
  path = os.path.join(folder, "conditions.safetensors")
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(UserError, match=f"{path} is not a readable conditions file"):
    job.run(tiny_config(tmp_path / "w", **{"model.path": folder}))
  assert not (tmp_path / "w").exists()


def test_cli_missing_config_file_with_overrides_names_the_path():
  proc = _cli("--config", "nope.py", "--config.method=rtn")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith("error: cannot load the --config file nope.py: no such file")


def test_cli_warns_about_missing_fields_then_names_bad_weights(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  folder = model_copy(tmp_path / "m", lambda t: t["proj_out.weight"].fill(np.nan))
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  del config["sample_width"]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  proc = _cli("--config", "configs/w4a6.py", "--config.method=rtn",
              f"--config.model.path={folder}", f"--config.workdir={tmp_path}/w")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines[0].startswith(f"warning: {folder}/config.json has no sample_width: taking the "
                             "default sample_width=90 (diffusers fills the same defaults)")
  assert lines[-1] == (f"error: model.path '{folder}' is not a supported model: {folder} has "
                       "NaN or Inf weights in 1 tensor: proj_out.kernel; the checkpoint is "
                       "corrupt or was saved from a diverged training run")
  assert not (tmp_path / "w").exists()


def test_disk_full_inside_safetensors_is_one_line(tmp_path, monkeypatch):
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel

  def full_disk(model, folder, dtype):
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")
  monkeypatch.setattr(job, "save_diffusers", full_disk)
  workdir = tmp_path / "w"
  with pytest.raises(UserError) as e:
    job.run(tiny_config(workdir, **{"eval.num_videos": 1}))
  assert str(e.value) == f"cannot write {workdir}/.fp_bf16_size_probe: No space left on device"
  assert os.listdir(workdir) == ["fingerprint.json"]
