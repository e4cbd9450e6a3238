"""`s2q_jax.compare`: one run per (seed, bits, method), shared FP videos and pool per seed,
mean ± std over seeds, resumable outputs."""
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
  return workdir, variants, compare.run_grid(workdir, ["w4a6", "w3a6"], variants, _tiny,
                                             seeds=(0, 1))


def test_every_method_sees_the_same_videos_and_pool_within_a_seed(grid):
  workdir, _, reports = grid
  assert [(r["seed"], r["bits"], r["method"]) for r in reports] == [
      (s, b, m) for s in (0, 1) for b in ("w4a6", "w3a6") for m in ("rtn", "qvd")]
  videos = []
  for seed in (0, 1):
    with np.load(f"{workdir}/seed{seed}/fp_videos.npz") as f:
      assert f["videos"].shape[0] == 2
      videos.append(f["videos"])
  assert not np.allclose(videos[0], videos[1])  # a seed changes the evaluation noise
  assert all(r["eval"]["seed"] == r["seed"] for r in reports)
  psnr = {(r["seed"], r["bits"], r["method"]): r["metrics"]["psnr"] for r in reports}
  for seed in (0, 1):
    assert psnr[(seed, "w4a6", "rtn")] > psnr[(seed, "w3a6", "rtn")]  # fewer bits, worse


def test_summary_is_mean_and_sample_std_over_seeds(grid):
  _, _, reports = grid
  summary = compare.summarize(reports)
  assert [(s["method"], s["bits"]) for s in summary] == [
      ("rtn", "w4a6"), ("qvd", "w4a6"), ("rtn", "w3a6"), ("qvd", "w3a6")]
  for s in summary:
    for m in compare.METRICS:
      values = [r["metrics"][m] for r in reports if (r["name"], r["bits"]) ==
                (s["method"], s["bits"])]
      assert s["seeds"] == [0, 1]
      assert s["metrics"][m]["mean"] == pytest.approx(np.mean(values))
      assert s["metrics"][m]["std"] == pytest.approx(np.std(values, ddof=1))
      assert s["metrics"][m]["std"] > 0  # different noise, different numbers


def test_outputs_and_resume(grid, monkeypatch):
  workdir, variants, reports = grid
  table, paths = compare.write_outputs(workdir, reports, baseline="rtn")
  with open(f"{workdir}/comparison.json") as f:
    out = json.load(f)
  assert [r["method"] for r in out["results"]] == ["rtn", "qvd"] * 4
  assert set(out["results"][0]) == {"method", "bits", "seed", "metrics", "size", "timing",
                                    "metrics_standard_error", "metrics_per_video"}
  assert out["results"][0]["size"]["compression"] > 3
  assert set(out["summary"][0]["metrics"]["psnr"]) == {"mean", "std"}
  summary, paired = table.split("\n\nPaired with rtn")
  assert summary.count("\n") == 5 and "| W3A6 | qvd | 2 |" in summary and " ± " in summary
  # qvd − rtn from the reports' own per-video scores, pooled over both seeds
  runs = {(r["seed"], r["bits"], r["name"]): r["metrics_per_video"]["psnr"] for r in reports}
  d = np.concatenate([np.subtract(runs[(s, "w3a6", "qvd")], runs[(s, "w3a6", "rtn")])
                      for s in (0, 1)])
  row = next(l for l in paired.splitlines() if l.startswith("| W3A6 | qvd |"))
  assert f"| {d.mean():+.2f} ± {d.std(ddof=1) / 2:.2f} |" in row
  with open(paths[-1], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  def no_rerun(cfg):
    raise AssertionError(f"{cfg.workdir} ran again")
  monkeypatch.setattr(job, "run", no_rerun)
  again = compare.run_grid(workdir, ["w4a6", "w3a6"], variants, _tiny, seeds=(0, 1))
  assert [r["metrics"] for r in again] == [r["metrics"] for r in reports]


def test_bad_method_or_seeds_is_a_usage_error(capsys):
  with pytest.raises(SystemExit):
    compare.main(["--methods", "rtn,magic", "--workdir", "/tmp/unused"])
  assert "unknown method(s) magic" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    compare.main(["--seeds", "0,x", "--workdir", "/tmp/unused"])
  assert "comma-separated integers" in capsys.readouterr().err
