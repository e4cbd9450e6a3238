"""The main job over 2 processes × 4 CPU devices: the same result as 1 process × 8 devices.

Processes talk over 127.0.0.1 (JAX's coordination service, gloo collectives on
CPU). Process 1 is given a workdir of its own that must never appear: only
process 0 reads and writes. The two-process run is killed after its first
block, as a preempted pod would be, and resumed.
"""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from conversion.flax_to_diffusers import save_diffusers
from s2q_jax import job, multihost, pipeline
from s2q_jax.deploy import WEIGHTS_NAME
from s2q_jax.errors import UserError
from s2q_jax.job_config import base_config
from s2q_jax.models import CogVideoXTransformer3D
from tiny import ONE_BLOCK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".pytest_cache", "xla_multiprocess")
TIMEOUT = 1800  # seconds per job: only a safety net against a hang
# S²Q at the smallest settings that still train: 4 pool positions and their null-prompt
# twins give 8 inputs (one per device), 2 epochs of one step.
TINY = ["--config.calib.num_prompts=2", "--config.sampler.num_steps=2",
        "--config.calib.num_samples=8", "--config.distill.batch_size=8",
        "--config.distill.epochs=2", "--config.eval.num_videos=3", "--config.eval.frames=2",
        "--config.eval.height=8", "--config.eval.width=8"]


def pod_command(workdir, coordinator, num_processes, process_id):
  """What every host of a pod runs (README), here with the coordinator given explicitly."""
  return [sys.executable, "-m", "s2q_jax.main", "--config", "configs/w4a6.py",
          f"--config.workdir={workdir}", f"--config.mesh.coordinator={coordinator}",
          f"--config.mesh.num_processes={num_processes}",
          f"--config.mesh.process_id={process_id}"]


def _env(devices):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A random two-block model as a diffusers folder (no stored conditions: random prompts)."""
  folder = tmp_path_factory.mktemp("model")
  save_diffusers(CogVideoXTransformer3D(dataclasses.replace(ONE_BLOCK, num_layers=2),
                                        rngs=nnx.Rngs(0)), str(folder))
  return folder


def _launch(workdirs, model_dir, stop_after=None):
  """Runs the job on len(workdirs) processes (process i with workdirs[i]); their outputs.

  With `stop_after`, every process is killed once process 0 reports that block done.
  """
  port = _free_port()
  logs = [None] + [tempfile.TemporaryFile("w+") for _ in workdirs[1:]]  # never a full pipe
  procs = [subprocess.Popen(
      pod_command(w, f"127.0.0.1:{port}", len(workdirs), i) + TINY
      + [f"--config.model.path={model_dir}", f"--config.compilation_cache={CACHE}_{i}"],
      cwd=ROOT, env=_env(4), stdout=logs[i] or subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i, w in enumerate(workdirs)]
  watchdog = threading.Timer(TIMEOUT, lambda: [p.kill() for p in procs])
  watchdog.start()
  try:
    if stop_after is None:
      outs = [procs[0].communicate()[0]]
      for p, log in zip(procs[1:], logs[1:]):
        p.wait()
        log.seek(0)
        outs.append(log.read())
      for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-6000:]}\nprocess 0:\n{outs[0][-6000:]}"
      return outs
    lines = []
    for line in procs[0].stdout:
      lines.append(line)
      if line.strip().startswith(f"block {stop_after}/"):
        break
    assert any(line.strip().startswith(f"block {stop_after}/") for line in lines), \
        "".join(lines)[-3000:]
    return ["".join(lines)]
  finally:
    watchdog.cancel()
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()
    for log in logs[1:]:
      log.close()


def _single_process(workdir, model_dir):
  proc = subprocess.run(
      [sys.executable, "-m", "s2q_jax.main", "--config", "configs/w4a6.py",
       f"--config.workdir={workdir}", f"--config.model.path={model_dir}",
       f"--config.compilation_cache={CACHE}_single"] + TINY,
      cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return proc.stdout


def test_two_processes_resume_and_equal_one_process(tmp_path, model_dir):
  single = tmp_path / "single"
  _single_process(single, model_dir)

  pod, elsewhere = tmp_path / "pod", tmp_path / "process1_workdir"
  _launch([pod, elsewhere], model_dir, stop_after=1)  # preempted after block 1
  assert sorted(os.listdir(pod / "calibration")) == ["block_000.npz"]
  out0, out1 = _launch([pod, elsewhere], model_dir)
  assert "resumed after block 1" in out0
  assert "block 2/2" in out0 and "calibration" in out0
  assert "process 1 of 2" in out1 and "block 2/2" not in out1  # process 0 alone logs
  assert not elsewhere.exists()  # … and alone writes

  one, two = (json.loads((d / "report.json").read_text()) for d in (single, pod))
  assert one["calibration"]["devices"] == two["calibration"]["devices"] == 8
  assert one["calibration"]["selection"] == two["calibration"]["selection"]
  for key in ("psnr", "ssim", "temporal_consistency"):
    assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5), key
  a, b = (_checkpoint(d) for d in (single, pod))
  assert a.keys() == b.keys()
  codes = [k for k in a if k.endswith(".codes")]
  assert codes and all(np.array_equal(a[k], b[k]) for k in codes)
  # The rest agrees up to rounding: the gradients' all-reduce sums in another order across
  # processes than within one, which moves a learned value by a float32 ulp or so, and now
  # and then its float16 storage by one step.
  for name in set(a) - set(codes):
    scale = max(float(np.abs(a[name]).max()), 1e-6)
    assert float(np.abs(a[name] - b[name]).max()) <= 1e-5 * scale, name


def _checkpoint(workdir):
  """The exported checkpoint's tensors as float32 (packed codes are small integers: exact)."""
  with safe_open(str(workdir / "quantized_model" / WEIGHTS_NAME), framework="flax") as f:
    return {k: np.asarray(f.get_tensor(k).astype("float32")) for k in f.keys()}


@pytest.mark.parametrize("mesh,fragment", [
    (dict(coordinator="10.0.0.2"), "use host:port of process 0"),
    (dict(coordinator="10.0.0.2:1234"), "needs mesh.num_processes and mesh.process_id"),
    (dict(num_processes=2, process_id=0), "need mesh.coordinator"),
    (dict(coordinator="10.0.0.2:1234", num_processes=2, process_id=2), "must be in 0 … "),
    (dict(coordinator="10.0.0.2:1234", num_processes=0, process_id=0), "at least 1"),
])
def test_bad_mesh_settings_say_what_to_set(mesh, fragment):
  cfg, _ = pipeline.resolve(base_config(4, 6, "s2q"))  # as the job does before validating
  cfg.mesh.update(mesh)
  with pytest.raises(UserError, match=fragment):
    job.validate(cfg)


def test_mesh_settings_that_need_no_process_group():
  cfg = base_config(4, 6, "s2q")
  assert multihost.check_config(cfg.mesh) is None  # one process: nothing to join
  cfg.mesh.coordinator = "auto"  # a TPU pod: JAX discovers all three
  assert multihost.check_config(cfg.mesh) == (None, None, None)


def test_the_replaced_key_names_its_successor():
  proc = subprocess.run([sys.executable, "-m", "s2q_jax.main", "--config", "configs/w4a6.py",
                         "--config.calib.distributed=True"], cwd=ROOT, env=_env(1),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "calib.distributed was replaced by mesh.coordinator" in proc.stderr
  cfg, _ = pipeline.resolve(base_config(4, 6, "s2q"))
  cfg.calib.distributed = True  # a config file of an older version that still sets it
  with pytest.raises(UserError, match="mesh.coordinator=auto"):
    job.validate(cfg)
