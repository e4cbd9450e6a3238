"""S²Q-VDiT ablations: the main job with one component switched off, next to RTN and S²Q.

  python -m s2q_jax.tools.ablation --bits w4a6,w3a6,w4a4 --workdir workdir/ablation

Variants: rtn, s2q, s2q without salient selection (uniform), s2q without
token weighting (uniform λ). Runs share the model, evaluation noise and
conditions, FP videos and candidate pool (see `s2q_jax.compare`, whose runner
this uses); finished runs are not run again.
"""
from __future__ import annotations

import argparse
import os
import sys

from s2q_jax.compare import markdown_table, run_grid

VARIANTS = {
    "rtn": ("rtn", {}),
    "s2q": ("s2q", {}),
    "s2q-uniform-selection": ("s2q", {"calib.selection": "uniform"}),
    "s2q-no-token-weighting": ("s2q", {"distill.token_weighting": "uniform"}),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bits", default="w4a6,w3a6,w4a4")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--workdir", default="workdir/ablation")
  args = parser.parse_args(argv)
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
  reports = run_grid(args.workdir, args.bits.split(","), {n: VARIANTS[n] for n in names})
  table = markdown_table(reports)
  with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
