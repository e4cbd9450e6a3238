"""Compares quantization methods on one model: same conditions, noise, FP videos and pool.

  python -m s2q_jax.compare --methods rtn,vidit_q,q_vdit,qvd,s2q --bits w4a6,w3a6 --workdir DIR

Each (bits, method) runs the main job in DIR/<bits>_<method>/ with the default
config for those bits, so every method sees the same evaluation noise and
conditions; the full-precision videos are generated once (DIR/fp_videos.npz)
and the calibration candidate pool is built once (DIR/pool.npz). Writes
DIR/comparison.json, DIR/comparison.md and DIR/comparison.png (quality
against bits per method). Interrupted? Run the same command again: finished
runs (a report.json) are kept and S²Q resumes at its next block, as long as
their fingerprint (settings, model files, code) matches what would run now;
a run made otherwise is deleted and run again.

Exit codes: 0 done; 1 a run stopped (one `error:` line); 2 a bad command line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from typing import Callable, Sequence

from s2q_jax import embedded, fingerprint, job, outputs
from s2q_jax import workdir as workdir_lib
from s2q_jax.errors import UserError, show_warning
from s2q_jax.job_config import base_config
from s2q_jax.methods import METHODS
from s2q_jax.quant import parse_bits


def run_grid(workdir: str, bits_list: Sequence[str], variants: dict[str, tuple[str, dict]],
             configure: Callable | None = None) -> list[dict]:
  """Runs (or reuses) the job for every bits × variant; returns their reports in that order.

  `variants` maps a row name to (method, {dotted config key: value}).
  """
  reports = []
  for bits in bits_list:
    w_bits, a_bits = parse_bits(bits)
    for name, (method, overrides) in variants.items():
      folder = os.path.join(workdir, f"{bits}_{name}")
      report_path = os.path.join(folder, "report.json")
      cfg = base_config(w_bits, a_bits, method)
      cfg.workdir = folder
      cfg.calib.pool_path = os.path.join(workdir, "pool.npz")
      cfg.eval.fp_videos_path = os.path.join(workdir, "fp_videos.npz")
      for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
          node = node[p]
        node[leaf] = value
      if configure:
        configure(cfg)
      now = fingerprint.of_run(cfg, cfg.model.path or embedded.path())
      stale = _stale(folder, now)
      if os.path.exists(report_path) and not stale:
        print(f"=== {bits} {name}: done before, reusing {report_path}", flush=True)
      else:
        if stale:  # compare owns these folders: recompute into a clean one, never mix
          print(f"=== {bits} {name}: {folder} was made with {stale}; running again", flush=True)
          shutil.rmtree(folder)
        print(f"\n=== {bits} {name} ===", flush=True)
        job.run(cfg)
      with open(report_path) as f:
        reports.append({"name": name, "bits": bits, **json.load(f)})
  return reports


def _stale(folder: str, now: dict) -> str | None:
  """What differs between the run stored in `folder` and `now`; None if nothing (or no run)."""
  if not os.path.isdir(folder):
    return None
  stored = workdir_lib.stored_fingerprint(folder)
  report_path = os.path.join(folder, "report.json")
  if os.path.exists(report_path):
    try:
      with open(report_path) as f:
        stored = json.load(f).get("fingerprint")
    except (OSError, ValueError):
      return "an unreadable report.json"
  if stored is None:
    return "no fingerprint (an older s2q-jax)" if os.listdir(folder) else None
  return fingerprint.describe(stored, now) or None


def _fmt(value, spec: str) -> str:
  return "—" if value is None else format(value, spec)  # null: inf PSNR of identical videos


def markdown_table(reports: list[dict]) -> str:
  lines = ["| bits | method | PSNR (dB) | SSIM | temporal consistency | compression | time (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in reports:
    m = r["metrics"]
    lines.append(f"| {r['bits'].upper()} | {r['name']} | {_fmt(m['psnr'], '.2f')} | {m['ssim']:.4f} | "
                 f"{m['temporal_consistency']:.4f} | {r['size']['compression']:.2f}× | "
                 f"{sum(r['timing'].values()):.0f} |")
  return "\n".join(lines)


def plot(reports: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  bits = list(dict.fromkeys(r["bits"] for r in reports))
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for metric, label, ax in (("psnr", "PSNR vs full precision (dB)", axes[0]),
                            ("ssim", "SSIM vs full precision", axes[1])):
    for name in dict.fromkeys(r["name"] for r in reports):
      rows = {r["bits"]: r["metrics"][metric] for r in reports if r["name"] == name}
      ax.plot([b.upper() for b in bits], [rows.get(b, float("nan")) for b in bits], "o-",
              label=name)
    ax.set_xlabel("bits")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--bits", default="w4a6,w3a6")
  parser.add_argument("--workdir", default="workdir/compare")
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  bits_list = [b.strip().lower() for b in args.bits.split(",") if b.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
  for b in bits_list:
    try:
      parse_bits(b)
    except ValueError as e:
      parser.error(str(e))
  warnings.showwarning = show_warning
  try:
    try:
      os.makedirs(args.workdir, exist_ok=True)
    except OSError as e:
      raise outputs.io_error(args.workdir, e) from None
    reports = run_grid(args.workdir, bits_list, {m: (m, {}) for m in methods})
    table, paths = write_outputs(args.workdir, reports)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n" + table + "\n\n" + "\n".join(f"wrote {p}" for p in paths))
  return 0


def write_outputs(workdir: str, reports: list[dict]) -> tuple[str, list[str]]:
  """comparison.json / .md / .png in `workdir`; returns (the markdown table, the paths)."""
  results = [{"method": r["method"], "bits": r["bits"], "metrics": r["metrics"],
              "size": r["size"], "timing": r["timing"]} for r in reports]
  paths = {ext: os.path.join(workdir, f"comparison.{ext}") for ext in ("json", "md", "png")}
  outputs.write_json(paths["json"], {"results": results})
  table = markdown_table(reports)
  outputs.write_text(paths["md"], table + "\n")
  outputs.write_with(paths["png"], lambda tmp: plot(reports, tmp))
  return table, list(paths.values())


if __name__ == "__main__":
  sys.exit(main())
