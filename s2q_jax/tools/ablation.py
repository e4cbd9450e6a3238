"""Runs the main job for several methods and bit-widths and prints one comparison table.

  python -m s2q_jax.tools.ablation --bits w4a6,w3a6,w4a4 --workdir workdir/ablation

Variants: rtn, s2q, s2q without salient selection (uniform), s2q without
token weighting (uniform λ). Every run uses the same model, evaluation noise
and conditions, and the s2q runs share one candidate pool. Finished runs
(a report.json in their folder) are not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from s2q_jax import job
from s2q_jax.job_config import base_config
from s2q_jax.quant import parse_bits

VARIANTS = {
    "rtn": ("rtn", {}),
    "s2q": ("s2q", {}),
    "s2q-uniform-selection": ("s2q", {"calib.selection": "uniform"}),
    "s2q-no-token-weighting": ("s2q", {"distill.token_weighting": "uniform"}),
}


def _set(cfg, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bits", default="w4a6,w3a6,w4a4")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--workdir", default="workdir/ablation")
  args = parser.parse_args(argv)
  rows = []
  for bits in args.bits.split(","):
    w_bits, a_bits = parse_bits(bits)
    for name in args.variants.split(","):
      method, overrides = VARIANTS[name]
      if name not in VARIANTS:
        parser.error(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
      folder = os.path.join(args.workdir, f"{bits}_{name}")
      report_path = os.path.join(folder, "report.json")
      if not os.path.exists(report_path):
        print(f"\n=== {bits} {name} ===", flush=True)
        cfg = base_config(w_bits, a_bits, method)
        cfg.workdir = folder
        cfg.calib.pool_path = os.path.join(args.workdir, "pool.npz")
        for key, value in overrides.items():
          _set(cfg, key, value)
        job.run(cfg)
      with open(report_path) as f:
        r = json.load(f)
      rows.append((bits.upper(), name, r["metrics"], sum(r["timing"].values())))
  lines = ["| bits | method | PSNR (dB) | SSIM | temporal consistency | time (s) |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {b} | {n} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
            f"{m['temporal_consistency']:.4f} | {t:.0f} |" for b, n, m, t in rows]
  table = "\n".join(lines)
  with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
