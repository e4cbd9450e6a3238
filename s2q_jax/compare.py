"""Compares quantization methods on one model over several seeds: mean ± std per (method, bits).

  python -m s2q_jax.compare --methods rtn,vidit_q,q_vdit,qvd,s2q --bits w4a6,w3a6 --seeds 0,1,2 \\
      --workdir DIR [--set model.path=MODEL_DIR --set sampler.num_steps=10 ...]

Each (seed, bits, method) runs the main job in DIR/seed<s>/<bits>_<method>/
with the default config for those bits and `seed` = s. A seed changes the
evaluation noise, the calibration noise (so the candidate pool) and the
training order; within a seed every method sees the same evaluation noise,
conditions, full-precision videos (DIR/seed<s>/fp_videos.npz, generated
once) and candidate pool (DIR/seed<s>/pool.npz, built once). Writes
DIR/comparison.json (one row per run, plus `summary`: mean and sample std
over seeds), DIR/comparison.md and DIR/comparison.png. Interrupted? Run the
same command again: finished runs (a report.json) are kept and S²Q resumes
at its next block, as long as their fingerprint (settings, model files, code)
matches what would run now; a run made otherwise is deleted and run again.

Exit codes: 0 done; 1 a run stopped (one `error:` line); 2 a bad command line.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import warnings
from typing import Callable, Sequence

import numpy as np

from s2q_jax import fingerprint, job, outputs
from s2q_jax import workdir as workdir_lib
from s2q_jax.errors import UserError, show_warning
from s2q_jax.evaluation.metrics import mean_and_standard_error
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
        label = f"seed {seed} {bits} {name}"
        stale = _stale(folder, job.run_fingerprint(cfg))
        if os.path.exists(report_path) and not stale:
          print(f"=== {label}: done before, reusing {report_path}", flush=True)
        else:
          if stale:  # compare owns these folders: recompute into a clean one, never mix
            print(f"=== {label}: {folder} was made with {stale}; running again", flush=True)
            shutil.rmtree(folder)
          print(f"\n=== {label} ===", flush=True)
          job.run(cfg)
        with open(report_path) as f:
          reports.append({"name": name, "bits": bits, "seed": seed, **json.load(f)})
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


def summarize(reports: list[dict]) -> list[dict]:
  """Mean and sample standard deviation over seeds of each metric, per (row name, bits)."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in reports:
    groups.setdefault((r["name"], r["bits"]), []).append(r)
  out = []
  for (name, bits), rows in groups.items():
    metrics = {}
    for m in METRICS:
      values = [r["metrics"][m] for r in rows]
      if any(v is None for v in values):  # null: the inf PSNR of identical videos
        metrics[m] = {"mean": None, "std": None}
        continue
      values = np.array(values, np.float64)
      std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      metrics[m] = {"mean": float(values.mean()), "std": std}
    out.append({"method": name, "bits": bits, "seeds": [r["seed"] for r in rows],
                "metrics": metrics,
                "compression": float(np.mean([r["size"]["compression"] for r in rows])),
                "seconds": float(np.mean([sum(r["timing"].values()) for r in rows]))})
  return out


def markdown_table(summary: list[dict]) -> str:
  """Mean ± std over seeds (the value alone for one seed); best mean PSNR and SSIM of each
  bit-width in bold."""
  best = {}
  for s in summary:
    for m in ("psnr", "ssim"):
      key = (s["bits"], m)
      mean = s["metrics"][m]["mean"]
      best[key] = max(best.get(key, -np.inf), np.inf if mean is None else mean)

  def cell(s, m, digits):
    v = s["metrics"][m]
    if v["mean"] is None:
      return "—"
    text = f"{v['mean']:.{digits}f}"
    if len(s["seeds"]) > 1:  # one seed has no spread to show
      text += f" ± {v['std']:.{digits}f}"
    return f"**{text}**" if m in ("psnr", "ssim") and v["mean"] == best[(s["bits"], m)] else text

  lines = ["| bits | method | seeds | PSNR (dB) | SSIM | temporal consistency | compression | "
           "time (s) |", "|---|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(f"| {s['bits'].upper()} | {s['method']} | {len(s['seeds'])} | "
                 f"{cell(s, 'psnr', 2)} | {cell(s, 'ssim', 4)} | "
                 f"{cell(s, 'temporal_consistency', 4)} | {s['compression']:.2f}× | "
                 f"{s['seconds']:.0f} |")
  return "\n".join(lines)


def paired_table(runs: Sequence[dict], baseline: str) -> str:
  """Markdown: per (bits, method) the means over seeds, and the paired per-video
  differences to `baseline`'s run at the same bits and seed.

  `runs`: dicts with "method", "bits", "seed" and per-video "psnr" and "ssim"
  lists. Runs of one seed score the same videos, so differences video by video
  cancel most of the video-to-video spread that dominates a single mean. Per
  seed: mean ± standard error; pooled: over every (seed, video) pair.
  """
  groups: dict[tuple[str, str], dict[int, dict]] = {}
  for r in runs:
    groups.setdefault((r["bits"].upper(), r["method"]), {})[r["seed"]] = r
  lines = [f"| bits | method | seeds | PSNR (dB) | SSIM | PSNR − {baseline} per seed (± s.e.) | "
           f"PSNR − {baseline} pooled | SSIM − {baseline} pooled |", "|---|---|---|---|---|---|---|---|"]
  for (bits, method), by_seed in groups.items():
    psnr = np.mean([np.mean(r["psnr"]) for r in by_seed.values()])
    ssim = np.mean([np.mean(r["ssim"]) for r in by_seed.values()])
    per_seed, pooled = [], {"psnr": [], "ssim": []}
    for seed, r in sorted(by_seed.items()):
      base = groups.get((bits, baseline), {}).get(seed)
      if base is None or method == baseline:
        continue
      for m in pooled:
        pooled[m].append(np.subtract(r[m], base[m]))
      d, se = mean_and_standard_error(pooled["psnr"][-1])
      per_seed.append(f"{d:+.2f} ± {se:.2f}")
    cells = ["—", "—", "—"]
    if per_seed:
      (dp, dp_se), (ds, ds_se) = (mean_and_standard_error(np.concatenate(pooled[m]))
                                  for m in ("psnr", "ssim"))
      cells = [", ".join(per_seed), f"{dp:+.2f} ± {dp_se:.2f}", f"{ds:+.4f} ± {ds_se:.4f}"]
    lines.append(f"| {bits} | {method} | {len(by_seed)} | {psnr:.2f} | {ssim:.4f} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def _paired_runs(reports: list[dict]) -> list[dict]:
  """The reports that kept per-video scores (an older s2q-jax did not), as `paired_table` takes."""
  return [{"method": r["name"], "bits": r["bits"], "seed": r["seed"],
           "psnr": r["metrics_per_video"]["psnr"], "ssim": r["metrics_per_video"]["ssim"]}
          for r in reports if "metrics_per_video" in r]


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
      rows = {b: v if v["mean"] is not None else nan for b, v in rows.items()}
      ax.errorbar([b.upper() for b in bits], [rows.get(b, nan)["mean"] for b in bits],
                  yerr=[rows.get(b, nan)["std"] for b in bits], fmt="o-", capsize=3, label=name)
    ax.set_xlabel("bits")
    ax.set_ylabel(label + " (mean ± std over seeds)")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(workdir: str, reports: list[dict], stem: str = "comparison",
                  baseline: str = "") -> tuple[str, list[str]]:
  """<stem>.json / .md / .png in `workdir`; returns (the markdown tables, the paths).

  With a `baseline` row name among the reports, the tables include the paired
  per-video differences to it (`paired_table`).
  """
  results = [{"method": r["name"], "bits": r["bits"], "seed": r["seed"], "metrics": r["metrics"],
              **{k: r[k] for k in ("metrics_standard_error", "metrics_per_video") if k in r},
              "size": r["size"], "timing": r["timing"]} for r in reports]
  summary = summarize(reports)
  paths = {ext: os.path.join(workdir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
  outputs.write_json(paths["json"], {"results": results, "summary": summary})
  table = markdown_table(summary)
  paired = _paired_runs(reports)
  if any(r["method"] == baseline for r in paired):
    table += ("\n\nPaired with " + baseline + " (same seed, same videos; ± standard error):\n\n"
              + paired_table(paired, baseline))
  outputs.write_text(paths["md"], table + "\n")
  outputs.write_with(paths["png"], lambda tmp: plot(summary, tmp))
  return table, list(paths.values())


def parse_settings(items: Sequence[str]) -> dict[str, object]:
  """{dotted config key: value} from KEY=VALUE strings; each key must exist in the job config."""
  known = base_config(4, 6, "rtn")
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    key = key.strip()
    node = known
    for part in key.split(".")[:-1] if sep else ():
      node = node.get(part) if hasattr(node, "get") else None
    if not sep or not hasattr(node, "get") or key.split(".")[-1] not in node:
      raise ValueError(f"--set {item!r}: give KEY=VALUE with KEY a main-job config key, "
                       "e.g. model.path=DIR")
    if key in ("method", "seed", "workdir", "quant.w_bits", "quant.a_bits"):
      raise ValueError(f"--set {key}: compare sets it from --methods, --seeds, --bits, --workdir")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text  # a plain string, e.g. a path
  return out


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
  parser.add_argument("--baseline", default="q_vdit",
                      help="method the paired per-video differences are taken against "
                           "(no paired table if it is not among --methods)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a main-job config setting for every run, e.g. model.path=DIR or "
                           "sampler.num_steps=10 (values as Python literals); repeatable")
  args = parser.parse_args(argv)
  try:
    settings = parse_settings(args.set)
  except ValueError as e:
    parser.error(str(e))
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
  warnings.showwarning = show_warning
  try:
    try:
      os.makedirs(args.workdir, exist_ok=True)
    except OSError as e:
      raise outputs.io_error(args.workdir, e) from None
    reports = run_grid(args.workdir, bits_list, {m: (m, dict(settings)) for m in methods},
                       seeds=seeds)
    table, paths = write_outputs(args.workdir, reports, baseline=args.baseline)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n" + table + "\n\n" + "\n".join(f"wrote {p}" for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
