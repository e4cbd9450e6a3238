"""S²Q-VDiT ablations: the main job with one component changed, over seeds, next to S²Q.

  python -m s2q_jax.tools.ablation --bits w4a6 --seeds 0,1,2 --workdir workdir/ablation

Variants: s2q (default), the paper's literal global salient selection, 5
selection bands (the previous default) with equal quotas or quotas ∝ diffusion
salience, one-step bands spread over the trajectory, x̂₀ diffusion salience,
uniform selection, uniform token weights, no learned Kronecker transform, no
learned activation clipping, the Kronecker transform started at Hadamard
instead of the identity, round-to-nearest codes instead of GPTQ's at the
freeze. With `--workdir` of a
`compare` run the s2q rows are reused. Runs share the model, evaluation noise and conditions,
FP videos and candidate pool of each seed (`s2q_jax.compare`, whose runner
this uses); finished runs are not run again. Writes ablation.json / .md / .png.
"""
from __future__ import annotations

import argparse
import sys

from s2q_jax.compare import parse_seeds, run_grid, write_outputs

VARIANTS = {
    "s2q": ("s2q", {}),
    "salient (literal)": ("s2q", {"calib.selection": "salient"}),
    "5 bands": ("s2q", {"calib.bands": 5}),
    "5 bands with salience quotas": ("s2q", {"calib.bands": 5, "calib.band_quota": "salience"}),
    "spread bands": ("s2q", {"calib.band_layout": "spread"}),
    "x0 diffusion salience": ("s2q", {"calib.diffusion_salience": "x0"}),
    "uniform selection": ("s2q", {"calib.selection": "uniform"}),
    "uniform token weights": ("s2q", {"distill.token_weighting": "uniform"}),
    "no learned transform": ("s2q", {"distill.transform": "none"}),
    "no activation clipping": ("s2q", {"distill.act_clip": False}),
    "Hadamard transform start": ("s2q", {"distill.transform_init": "hadamard"}),
    "no GPTQ": ("s2q", {"distill.gptq": False}),
}


def _folder_name(name: str) -> str:
  return name.replace(" ", "_").replace("(", "").replace(")", "")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bits", default="w4a6")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(_folder_name(n) for n in VARIANTS))
  parser.add_argument("--workdir", default="workdir/ablation")
  args = parser.parse_args(argv)
  by_folder = {_folder_name(n): n for n in VARIANTS}
  chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in chosen if v not in by_folder]
  if unknown:
    parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(by_folder)}")
  try:
    seeds = parse_seeds(args.seeds)
  except ValueError as e:
    parser.error(str(e))
  variants = {_folder_name(by_folder[v]): VARIANTS[by_folder[v]] for v in chosen}
  reports = run_grid(args.workdir, args.bits.split(","), variants, seeds=seeds)
  for r in reports:
    r["name"] = by_folder[r["name"]]
  table, paths = write_outputs(args.workdir, reports, stem="ablation", baseline="s2q")
  print("\n" + table + "\n\n" + "\n".join(f"wrote {p}" for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
