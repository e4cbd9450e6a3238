"""The main job end to end (tiny settings) and its one-line errors, through the real CLI."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# S²Q calibration is covered by test_s2q.py; here the CLI runs round-to-nearest to stay fast.
TINY = ["--config.method=rtn", "--config.eval.num_videos=2", "--config.sampler.num_steps=2"]


def _run(*args, cwd=ROOT):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "s2q_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_job_smoke(tmp_path):
  workdir = tmp_path / "w4a6"
  proc = _run("--config", "configs/w4a6.py", f"--config.workdir={workdir}", *TINY)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["method"] == "rtn" and (report["w_bits"], report["a_bits"]) == (4, 6)
  assert report["model"] == "embedded-dit"
  assert set(report["metrics"]) == {"psnr", "ssim", "temporal_consistency"}
  assert 10 < report["metrics"]["psnr"] < 80 and 0 < report["metrics"]["ssim"] <= 1
  size = report["size"]
  assert size["compression"] == pytest.approx(size["fp_bytes"] / size["quant_bytes"])
  assert 3 < size["compression"] < 4
  assert set(report["timing"]) >= {"load", "fp_generation", "quant_generation", "evaluation"}
  assert len(report["videos"]) == 2 and all(os.path.getsize(v) > 0 for v in report["videos"])
  assert (workdir / "report.md").read_text().startswith("# rtn W4A6")
  assert str(workdir / "report.json") in proc.stdout


def test_overrides_change_bits_and_layers(tmp_path):
  proc = _run("--config", "configs/w4a6.py", f"--config.workdir={tmp_path}",
              "--config.quant.w_bits=8", "--config.quant.a_bits=8",
              '--config.quant.overrides=(("^transformer_blocks\\.0\\.", "w3a6"),)', *TINY)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert (report["w_bits"], report["a_bits"]) == (8, 8)
  layers = json.loads((tmp_path / "quantized_model" / "config.json").read_text())["_s2q_jax"]
  bits = {p: (v["w_bits"], v["a_bits"]) for p, v in layers["layers"].items()}
  assert bits["transformer_blocks.0.ff.proj_in"] == (3, 6)
  assert bits["transformer_blocks.1.ff.proj_in"] == (8, 8)
  # Replacing the overrides drops the default 8-bit weight-only timestep MLP too.
  assert bits["time_embedding.linear_1"] == bits["norm_out.linear"] == (8, 8)
  assert sorted(report["layers"]["full_precision"]) == [
      "patch_embed.proj", "patch_embed.text_proj", "proj_out"]


@pytest.mark.parametrize("args,fragment", [
    (["--config.nonsense=1"], "unknown config key"),
    (["--config.quant.w_bits=9"], "quant.w_bits=9 is outside 2–8"),
    (["--config.quant.a_bits=1"], "quant.a_bits=1 is outside 2–8"),
    (["--config.method=magic"], "unknown method 'magic'"),
    (["--config.model.path=/nonexistent/model"], "is not a supported model"),
    (["--config.workdir=/proc/forbidden"], "cannot write to workdir"),
])
def test_bad_input_is_one_line_without_traceback(args, fragment):
  proc = _run("--config", "configs/w4a6.py", "--config.method=rtn", *args)
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr
  assert err[-1].startswith("error: ") and fragment in err[-1], proc.stderr[-2000:]


def test_missing_config_file_is_one_line():
  proc = _run("--config", "configs/does_not_exist.py")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "cannot load the --config file" in proc.stderr
