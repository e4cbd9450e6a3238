"""The paired table of `compare` and `tools.reevaluate`: means over seeds and paired
per-video differences, against numpy."""
import numpy as np

from s2q_jax.compare import paired_table


def test_paired_differences_and_means_over_seeds():
  rng = np.random.default_rng(0)
  runs = {}
  for seed in (0, 1):
    for method in ("s2q", "q_vdit"):
      runs[f"seed{seed}/{method}"] = {"method": method, "bits": "W4A6", "seed": seed,
                                      "psnr": rng.normal(27, 2, 5).tolist(),
                                      "ssim": rng.uniform(0.7, 0.9, 5).tolist()}
  lines = paired_table(list(runs.values()), "q_vdit").splitlines()
  row = next(l for l in lines if "| s2q |" in l)
  psnr = np.mean([np.mean(runs[f"seed{s}/s2q"]["psnr"]) for s in (0, 1)])
  assert f"| W4A6 | s2q | 2 | {psnr:.2f} |" in row
  for s in (0, 1):
    d = np.subtract(runs[f"seed{s}/s2q"]["psnr"], runs[f"seed{s}/q_vdit"]["psnr"])
    assert f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(5):.2f}" in row
  pooled = np.concatenate([np.subtract(runs[f"seed{s}/s2q"]["ssim"],
                                       runs[f"seed{s}/q_vdit"]["ssim"]) for s in (0, 1)])
  assert row.endswith(f"| {pooled.mean():+.4f} ± {pooled.std(ddof=1) / np.sqrt(10):.4f} |")
  assert next(l for l in lines if "| q_vdit |" in l).endswith("| — | — | — |")


def test_rows_are_named_by_run_folder_so_ablation_variants_stay_apart():
  from s2q_jax.tools.reevaluate import _row_name
  report = {"method": "s2q", "w_bits": 4, "a_bits": 6}
  assert _row_name("workdir/ablation/seed0/w4a6_uniform_selection/", report) == (
      "uniform_selection")
  assert _row_name("workdir/compare/seed1/w4a6_s2q", report) == "s2q"
  assert _row_name("/tmp/my_run", report) == "s2q"  # not a compare folder: the method
