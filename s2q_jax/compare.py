"""Compares quantization methods on one model over several seeds: mean ± std per (method, bits).

  python -m s2q_jax.compare --methods rtn,vidit_q,q_vdit,qvd,s2q --bits w4a6,w3a6 --seeds 0,1,2 \\
      --workdir DIR

Each (seed, bits, method) runs the main job in DIR/seed<s>/<bits>_<method>/
with the default config for those bits and `seed` = s. A seed changes the
evaluation noise, the calibration noise (so the candidate pool) and the
training order; within a seed every method sees the same evaluation noise,
conditions, full-precision videos (DIR/seed<s>/fp_videos.npz, generated
once) and candidate pool (DIR/seed<s>/pool.npz, built once). Writes
DIR/comparison.json (one row per run, plus `summary`: mean and sample std
over seeds), DIR/comparison.md and DIR/comparison.png. Interrupted? Run the
same command again: finished runs (a report.json) are kept and S²Q resumes
at its next block.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np

from s2q_jax import job
from s2q_jax.errors import UserError
from s2q_jax.job_config import base_config
from s2q_jax.methods import METHODS
from s2q_jax.quant import parse_bits

METRICS = ("psnr", "ssim", "temporal_consistency")


def run_grid(workdir: str, bits_list: Sequence[str], variants: dict[str, tuple[str, dict]],
             configure: Callable | None = None, seeds: Sequence[int] = (0,)) -> list[dict]:
  """Runs (or reuses) the job for every seed × bits × variant; their reports in that order.

  `variants` maps a row name to (method, {dotted config key: value}).
  """
  reports = []
  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed{seed}")
    for bits in bits_list:
      w_bits, a_bits = parse_bits(bits)
      for name, (method, overrides) in variants.items():
        folder = os.path.join(seed_dir, f"{bits}_{name}")
        report_path = os.path.join(folder, "report.json")
        if os.path.exists(report_path):
          print(f"=== seed {seed} {bits} {name}: done before, reusing {report_path}", flush=True)
        else:
          print(f"\n=== seed {seed} {bits} {name} ===", flush=True)
          cfg = base_config(w_bits, a_bits, method)
          cfg.seed = seed
          cfg.workdir = folder
          cfg.calib.pool_path = os.path.join(seed_dir, "pool.npz")
          cfg.eval.fp_videos_path = os.path.join(seed_dir, "fp_videos.npz")
          for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = cfg
            for p in parents:
              node = node[p]
            node[leaf] = value
          if configure:
            configure(cfg)
          job.run(cfg)
        with open(report_path) as f:
          reports.append({"name": name, "bits": bits, "seed": seed, **json.load(f)})
  return reports


def summarize(reports: list[dict]) -> list[dict]:
  """Mean and sample standard deviation over seeds of each metric, per (row name, bits)."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in reports:
    groups.setdefault((r["name"], r["bits"]), []).append(r)
  out = []
  for (name, bits), rows in groups.items():
    metrics = {}
    for m in METRICS:
      values = np.array([r["metrics"][m] for r in rows], np.float64)
      std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      metrics[m] = {"mean": float(values.mean()), "std": std}
    out.append({"method": name, "bits": bits, "seeds": [r["seed"] for r in rows],
                "metrics": metrics,
                "compression": float(np.mean([r["size"]["compression"] for r in rows])),
                "seconds": float(np.mean([sum(r["timing"].values()) for r in rows]))})
  return out


def markdown_table(summary: list[dict]) -> str:
  """Mean ± std over seeds; the best mean PSNR and SSIM of each bit-width in bold."""
  best = {}
  for s in summary:
    for m in ("psnr", "ssim"):
      key = (s["bits"], m)
      best[key] = max(best.get(key, -np.inf), s["metrics"][m]["mean"])

  def cell(s, m, digits):
    v = s["metrics"][m]
    text = f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    return f"**{text}**" if m in ("psnr", "ssim") and v["mean"] == best[(s["bits"], m)] else text

  lines = ["| bits | method | seeds | PSNR (dB) | SSIM | temporal consistency | compression | "
           "time (s) |", "|---|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(f"| {s['bits'].upper()} | {s['method']} | {len(s['seeds'])} | "
                 f"{cell(s, 'psnr', 2)} | {cell(s, 'ssim', 4)} | "
                 f"{cell(s, 'temporal_consistency', 4)} | {s['compression']:.2f}× | "
                 f"{s['seconds']:.0f} |")
  return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  bits = list(dict.fromkeys(s["bits"] for s in summary))
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for metric, label, ax in (("psnr", "PSNR vs full precision (dB)", axes[0]),
                            ("ssim", "SSIM vs full precision", axes[1])):
    for name in dict.fromkeys(s["method"] for s in summary):
      rows = {s["bits"]: s["metrics"][metric] for s in summary if s["method"] == name}
      nan = {"mean": float("nan"), "std": float("nan")}
      ax.errorbar([b.upper() for b in bits], [rows.get(b, nan)["mean"] for b in bits],
                  yerr=[rows.get(b, nan)["std"] for b in bits], fmt="o-", capsize=3, label=name)
    ax.set_xlabel("bits")
    ax.set_ylabel(label + " (mean ± std over seeds)")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(workdir: str, reports: list[dict], stem: str = "comparison"
                  ) -> tuple[str, list[str]]:
  """<stem>.json / .md / .png in `workdir`; returns (the markdown table, the paths)."""
  results = [{"method": r["name"], "bits": r["bits"], "seed": r["seed"], "metrics": r["metrics"],
              "size": r["size"], "timing": r["timing"]} for r in reports]
  summary = summarize(reports)
  paths = {ext: os.path.join(workdir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump({"results": results, "summary": summary}, f, indent=2)
  table = markdown_table(summary)
  with open(paths["md"], "w") as f:
    f.write(table + "\n")
  plot(summary, paths["png"])
  return table, list(paths.values())


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
  return seeds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--bits", default="w4a6,w3a6")
  parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
  parser.add_argument("--workdir", default="workdir/compare")
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  bits_list = [b.strip().lower() for b in args.bits.split(",") if b.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
  try:
    seeds = parse_seeds(args.seeds)
    for b in bits_list:
      parse_bits(b)
  except ValueError as e:
    parser.error(str(e))
  os.makedirs(args.workdir, exist_ok=True)
  try:
    reports = run_grid(args.workdir, bits_list, {m: (m, {}) for m in methods}, seeds=seeds)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table, paths = write_outputs(args.workdir, reports)
  print("\n" + table + "\n\n" + "\n".join(f"wrote {p}" for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
