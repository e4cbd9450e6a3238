"""Finished runs' checkpoints evaluated again on many fresh videos, with standard errors.

  python -m s2q_jax.tools.reevaluate --videos 32 --noise_seed 100 --baseline q_vdit \\
      --json workdir/reeval.json workdir/compare/seed*/w4a6_{s2q,q_vdit}

The job scores a run on `eval.num_videos` (16) videos, and one video's PSNR
varies by several dB with its noise: a run's 8-video mean has a standard
error near 1 dB, larger than the differences between the best methods, and
16 videos still about 0.5 dB.
This tool reloads each run's exported checkpoint (reference kernels) and
scores it against the full-precision model on `--videos` new videos drawn
from `--noise_seed` (the same videos for every run, none of them seen in
calibration or in the run's own evaluation), with the sampler settings in
the run's report.json. It prints each run's mean ± standard error and,
per seed, the paired difference to the `--baseline` method's run at the
same bits (same videos, so the video-to-video spread largely cancels).
The embedded model unless --model_path (a transformer folder with its
conditions, or random stand-in prompts as the job uses).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from s2q_jax import embedded, job
from s2q_jax.compare import paired_table
from s2q_jax.evaluation import metrics
from s2q_jax.generation import generate
from s2q_jax.job_config import base_config
from s2q_jax.pretrained import load_pretrained
from s2q_jax.sampling.scheduler_config import scheduler_for


def _read_report(run: str) -> dict:
  path = os.path.join(run, "report.json")
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, ValueError) as e:
    raise SystemExit(f"{run}: no readable report.json ({e}); give finished run folders")
  if not os.path.isdir(os.path.join(run, "quantized_model")):
    raise SystemExit(f"{run}: no quantized_model/ checkpoint")
  return report


def _row_name(run: str, report: dict) -> str:
  """The run's row: its folder's name after `compare`'s "<bits>_" prefix (so the ablation's
  variants of one method stay apart), else the report's method."""
  prefix = f"w{report['w_bits']}a{report['a_bits']}_"
  name = os.path.basename(os.path.normpath(run))
  return name[len(prefix):] if name.startswith(prefix) else report["method"]


def evaluate(runs: list[str], videos: int, noise_seed: int, model_path: str = "") -> dict:
  """{run: {"method", "bits", "seed", "psnr": [per video], "ssim": [...]}} on fresh videos."""
  reports = {run: _read_report(run) for run in runs}
  settings = {(r["eval"]["num_steps"], r["eval"]["guidance_scale"]) for r in reports.values()}
  if len(settings) != 1:
    raise SystemExit(f"the runs were sampled with different (steps, guidance): {sorted(settings)}")
  (steps, guidance), = settings
  cfg = base_config(4, 6, "rtn")
  cfg.model.path, cfg.seed = model_path, noise_seed
  cfg.eval.num_videos, cfg.sampler.num_steps, cfg.sampler.guidance_scale = videos, steps, guidance
  first = next(iter(reports.values()))
  cfg.eval.frames, _, cfg.eval.height, cfg.eval.width = first["eval"]["video_shape"]
  fp, folder, _ = job.load_model(cfg)
  noise, cond, uncond, _, cfg_scale = job.eval_inputs(cfg, fp, folder)
  gen = dict(num_steps=steps, guidance_scale=cfg_scale, log=None,
             scheduler=scheduler_for("", folder, steps, fp.default_scheduler_config()))
  print(f"{videos} full-precision videos (noise seed {noise_seed}, {steps} steps, guidance "
        f"{guidance})", flush=True)
  reference = generate(fp, noise, cond, uncond, **gen)
  out = {}
  for run, report in reports.items():
    q = load_pretrained(os.path.join(run, "quantized_model"), backend="reference")
    test = generate(q, noise, cond, uncond, **gen)
    psnr, ssim = metrics.psnr(reference, test), metrics.ssim(reference, test)
    out[run] = {"method": _row_name(run, report), "bits": f"W{report['w_bits']}A{report['a_bits']}",
                "seed": report["eval"]["seed"], "psnr": psnr.tolist(), "ssim": ssim.tolist()}
    (p, p_se), (s, s_se) = (metrics.mean_and_standard_error(x) for x in (psnr, ssim))
    print(f"  {run}: PSNR {p:.2f} ± {p_se:.2f} dB (min {psnr.min():.1f}), SSIM {s:.4f} ± "
          f"{s_se:.4f}", flush=True)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="finished run folders (report.json, quantized_model/)")
  parser.add_argument("--videos", type=int, default=32)
  parser.add_argument("--noise_seed", type=int, default=100,
                      help="seed of the new evaluation noise (runs used their own seed)")
  parser.add_argument("--baseline", default="q_vdit", help="method the paired differences use")
  parser.add_argument("--model_path", default="", help="'' = the embedded model")
  parser.add_argument("--json", default="", help="also write the per-video scores here")
  args = parser.parse_args(argv)
  if args.videos < 2:
    parser.error("--videos must be at least 2 (a standard error needs two)")
  results = evaluate(args.runs, args.videos, args.noise_seed, args.model_path)
  print("\n" + paired_table(list(results.values()), args.baseline))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"videos": args.videos, "noise_seed": args.noise_seed, "runs": results}, f,
                indent=1)
    print(f"\nper-video scores: {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
