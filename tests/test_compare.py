"""`s2q_jax.compare`: one run per (bits, method), shared FP videos and pool, resumable outputs."""
import json

import numpy as np
import pytest

from s2q_jax import compare, job


def _tiny(cfg):
  cfg.eval.num_videos, cfg.sampler.num_steps = 2, 2
  cfg.calib.num_prompts, cfg.calib.num_samples = 1, 2


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compare"))
  variants = {m: (m, {}) for m in ("rtn", "qvd")}
  return workdir, variants, compare.run_grid(workdir, ["w4a6", "w3a6"], variants, _tiny)


def test_every_method_sees_the_same_videos_and_pool(grid):
  workdir, _, reports = grid
  assert [(r["bits"], r["method"]) for r in reports] == [
      ("w4a6", "rtn"), ("w4a6", "qvd"), ("w3a6", "rtn"), ("w3a6", "qvd")]
  with np.load(f"{workdir}/fp_videos.npz") as f:
    assert f["videos"].shape[0] == 2
  assert all(r["eval"]["conditions"] == reports[0]["eval"]["conditions"] for r in reports)
  psnr = {(r["bits"], r["method"]): r["metrics"]["psnr"] for r in reports}
  assert psnr[("w4a6", "rtn")] > psnr[("w3a6", "rtn")]  # fewer bits, worse videos


def test_outputs_and_resume(grid, monkeypatch):
  workdir, variants, reports = grid
  table, paths = compare.write_outputs(workdir, reports)
  with open(f"{workdir}/comparison.json") as f:
    results = json.load(f)["results"]
  assert [r["method"] for r in results] == ["rtn", "qvd", "rtn", "qvd"]
  assert set(results[0]) == {"method", "bits", "metrics", "size", "timing"}
  assert results[0]["size"]["compression"] > 3
  assert table.count("\n") == 5 and "| W3A6 | qvd |" in table
  with open(paths[-1], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  def no_rerun(cfg):
    raise AssertionError(f"{cfg.workdir} ran again")
  monkeypatch.setattr(job, "run", no_rerun)
  again = compare.run_grid(workdir, ["w4a6", "w3a6"], variants, _tiny)
  assert [r["metrics"] for r in again] == [r["metrics"] for r in reports]


def test_bad_method_is_a_usage_error(capsys):
  with pytest.raises(SystemExit):
    compare.main(["--methods", "rtn,magic", "--workdir", "/tmp/unused"])
  assert "unknown method(s) magic" in capsys.readouterr().err
