"""The main job's outputs: report.json, report.md and the printed summary."""
from __future__ import annotations

import os
from typing import Any

from s2q_jax.outputs import write_json, write_text


def write_report(workdir: str, report: dict[str, Any]) -> tuple[str, str]:
  """Writes report.json and report.md into `workdir`; returns their paths."""
  json_path = os.path.join(workdir, "report.json")
  md_path = os.path.join(workdir, "report.md")
  # report.md first: report.json marks a finished run (`compare` reuses it), so it comes last.
  write_text(md_path, to_markdown(report))
  write_json(json_path, report)  # strict JSON; PSNR of identical videos (inf) is null
  return json_path, md_path


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


_DIGITS = {"psnr": 2, "ssim": 4, "temporal_consistency": 4}


def _with_se(r: dict[str, Any], metric: str, digits: int) -> str:
  """"mean ± standard error" (reports written before the standard error: the mean alone)."""
  text = f"{r['metrics'][metric]:.{digits}f}"
  se = r.get("metrics_standard_error", {}).get(metric)
  return text if se is None else f"{text} ± {se:.{digits}f}"


def to_markdown(r: dict[str, Any]) -> str:
  s, t = r["size"], r["timing"]
  lines = [
      f"# {r['method']} W{r['w_bits']}A{r['a_bits']} on {r['model']}", "",
      "Quantized vs full-precision videos generated from the same noise and conditions "
      f"({r['eval']['num_videos']} videos, {r['eval']['num_steps']} sampler steps, "
      f"guidance {r['eval']['guidance_scale']}).", "",
      "| PSNR (dB) | SSIM | temporal consistency |", "|---|---|---|",
      "| " + " | ".join(_with_se(r, k, d) for k, d in _DIGITS.items()) + " |", "",
      "Means over the videos ± their standard error: one video's score moves with its "
      "noise, so runs closer than about twice that are not told apart by these videos.", "",
      "## Size", "",
      "| weights in bf16 | quantized model | compression |", "|---|---|---|",
      f"| {_fmt_bytes(s['fp_bytes'])} | {_fmt_bytes(s['quant_bytes'])} | {s['compression']:.2f}× |",
      "",
      f"{len(r['layers']['quantized'])} layers quantized, "
      f"{len(r['layers']['full_precision'])} Linear layers kept in full precision: "
      + ", ".join(f"`{p}`" for p in r["layers"]["full_precision"]) + ".", "",
      "## Time per stage (s)", "",
      "| " + " | ".join(t) + " |", "|" + "---|" * len(t),
      "| " + " | ".join(f"{v:.1f}" for v in t.values()) + " |", "",
      "## Videos", "",
  ]
  lines += [f"- `{os.path.basename(g)}`" for g in r["videos"]]
  if r.get("calibration"):
    lines += ["", *_calibration_markdown(r["calibration"])]
  return "\n".join(lines) + "\n"


def _calibration_markdown(c: dict[str, Any]) -> list[str]:
  sel = c["selection"]
  n_inputs = sum(sel["step_histogram"])
  lines = ["## Calibration", "",
           f"{len(sel['positions'])} of {c['num_candidates']} candidate steps selected: "
           f"{n_inputs} model inputs, {sel['uncond']} of them with the null prompt"
           + (f"; sharded over {c['devices']} device(s)." if "devices" in c else "."), "",
           "Calibration inputs per sampler step (0 = noisiest):", "",
           "| step | " + " | ".join(str(i) for i in range(len(sel["step_histogram"]))) + " |",
           "|---|" + "---|" * len(sel["step_histogram"]),
           "| inputs | " + " | ".join(str(n) for n in sel["step_histogram"]) + " |", ""]
  if "timestep_boundaries" in c:
    lines += [f"Timestep ranges split at {c['timestep_boundaries']}; balanced "
              f"{c['balanced_layers']} layers.", ""]
  if "htdq" in c:
    choices = [v["shift"] for v in c["htdq"].values()]
    lines += ["HTDQ shifts of the temporal layers: "
              + ", ".join(f"{k} ×{choices.count(k)}" for k in sorted(set(choices))) + ".", ""]
  if "blocks" not in c:
    return lines
  # The host peak is each block's own (on Linux), so a block that needs more memory
  # than the one before shows; devices report only their peak so far.
  device = any(b.get("peak_device_gib") is not None for b in c["blocks"])
  lines += ["| block | time (s) | peak RSS (GiB) | " + ("peak device (GiB) | " if device else "")
            + "loss, first → last epoch | output MSE |",
            "|---|---|---|" + ("---|" if device else "") + "---|---|"]
  for b in c["blocks"]:
    loss = ("—" if b["loss_first_epoch"] is None
            else f"{b['loss_first_epoch']:.3g} → {b['loss_last_epoch']:.3g}")
    peak_device = b.get("peak_device_gib")
    lines.append(f"| {b['block']} | {b['seconds']:.1f} | {b['peak_rss_gib']:.2f} | "
                 + (f"{peak_device:.2f} | " if device and peak_device is not None
                    else "— | " if device else "")
                 + f"{loss} | {b['output_mse_after_freeze']:.3g} |")
  return lines


def summary_table(r: dict[str, Any]) -> str:
  s = r["size"]
  rows = [("method", r["method"]), ("bits", f"W{r['w_bits']}A{r['a_bits']}"),
          ("PSNR (dB)", _with_se(r, "psnr", 2)), ("SSIM", _with_se(r, "ssim", 4)),
          ("temporal consistency", _with_se(r, "temporal_consistency", 4)),
          ("weights bf16 → quantized", f"{_fmt_bytes(s['fp_bytes'])} → "
           f"{_fmt_bytes(s['quant_bytes'])} ({s['compression']:.2f}×)"),
          ("total time", f"{sum(r['timing'].values()):.1f} s")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
