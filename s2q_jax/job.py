"""The main job: load → FP videos → calibrate → quantize → quantized videos → evaluate → report."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from conversion.checkpoint_files import CheckpointError
from conversion.flax_to_diffusers import save_diffusers
from conversion.output_dir import atomic_output_dir
from s2q_jax import conditions as conditions_lib
from s2q_jax import deploy, embedded, finite, fingerprint, multihost, outputs, quant, sharding
from s2q_jax import pipeline as pipeline_lib
from s2q_jax import workdir as workdir_lib
from s2q_jax.data import gif
from s2q_jax.errors import UserError
from s2q_jax.evaluation import metrics, report as report_lib
from s2q_jax.calibration import pool as pool_lib
from s2q_jax.generation import generate
from s2q_jax.job_validation import REPLACED_DISTRIBUTED, validate, validate_devices  # noqa: F401
from s2q_jax.methods import CALIBRATORS
from s2q_jax.models import UnsupportedConfigError
from s2q_jax.pretrained import load_pretrained
from s2q_jax.sampling import sample_keys
from s2q_jax.sampling.scheduler_config import scheduler_for


def generation_mesh(cfg: ConfigDict) -> jax.sharding.Mesh | None:
  """This process's own devices as a (data, model) mesh; None (its first device) at model 1."""
  return sharding.make_mesh(cfg.mesh.model, jax.local_devices()) if cfg.mesh.model > 1 else None


def load_model(cfg: ConfigDict):
  """(model, folder, display name) for config.model.path (empty: the embedded model)."""
  folder = pipeline_lib.transformer_folder(cfg.model.path) if cfg.model.path else embedded.path()
  name = os.path.basename(os.path.normpath(cfg.model.path)) if cfg.model.path else embedded.NAME
  try:
    model = load_pretrained(folder, cfg.model.dtype)
  except (CheckpointError, UnsupportedConfigError, FileNotFoundError) as e:
    raise UserError(f"model.path {folder!r} is not a supported model: {e}") from None
  except OSError as e:
    raise outputs.io_error(e.filename or folder, e, "read") from None
  if getattr(model.config, "image_dim", None) is not None:
    raise UserError(f"model.path {folder!r} holds an image-to-video Wan model: the job has no "
                    "image conditions to give it; use a text-to-video Wan or CogVideoX")
  return model, folder, name


def eval_inputs(cfg: ConfigDict, model, folder: str,
                prompts: pipeline_lib.Conditions | None = None,
                pipe: pipeline_lib.Pipeline | None = None):
  """Noise, conditions, null condition, names of the evaluation videos, and the
  classifier-free guidance scale to sample them with.

  With a pipeline, `prompts` are the embedded prompts and eval.frames/height/
  width the decoded size; otherwise the latent size. The guidance scale is
  `sampler.guidance_scale` as the model applies it (`VideoDiT.apply_guidance`:
  1, no null-prompt pass, for a model that embeds it in its conditions).
  """
  n = cfg.eval.num_videos
  size = (cfg.eval.frames, cfg.eval.height, cfg.eval.width)
  if pipe is not None:
    size = pipe.latent_size(*size)
  if prompts is not None:
    cond, uncond, names = prompts.embeddings[:n], prompts.null, prompts.prompts[:n]
  elif conditions_lib.has_conditions(folder):
    try:
      table, names = conditions_lib.load_conditions(folder)
    except CheckpointError as e:
      raise UserError(f"model.path {folder!r}: {e}") from None
    idx = np.arange(n) % len(names)
    cond, uncond, names = table[idx], table[-1], [names[i] for i in idx]
  else:  # a real model's transformer alone: no text encoder here, so random stand-in "prompts"
    cond, uncond = model.stand_in_conditions(np.random.default_rng(cfg.seed), n)
    names = [f"random-{i}" for i in range(n)]
  cond, uncond, cfg_scale = model.apply_guidance(cond, uncond, cfg.sampler.guidance_scale)
  shape = (n, size[0], model.latent_channels, size[1], size[2])
  noise = np.asarray(jax.random.normal(jax.random.key(cfg.seed), shape), np.float32)
  return noise, cond, uncond, names, cfg_scale


class _Stages:
  """Times named stages and prints progress; an I/O failure ends the job with one line."""

  def __init__(self):
    self.timing: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str, what: str):
    print(f"[{len(self.timing) + 1}] {what}...", flush=True)
    start = time.perf_counter()
    try:
      yield
    except Exception as e:  # writes not wrapped by `outputs` (orbax checkpoints, the export)
      reason = outputs.write_failure(e)
      if reason is None:
        raise
      where = f"{e.filename}: " if getattr(e, "filename", None) else ""
      raise UserError(f"{where}{reason} (while {what})") from None
    self.timing[name] = time.perf_counter() - start
    print(f"    done in {self.timing[name]:.1f}s", flush=True)


def run(cfg: ConfigDict) -> dict[str, Any] | None:
  """Runs the job; the report (None on processes other than process 0 of a multi-process run).

  In a multi-process run every process runs this; process 0 alone logs and writes
  (see `multihost`).
  """
  cfg, pipe = pipeline_lib.resolve(cfg)  # unset sizes, steps, guidance: the pipeline's
  validate(cfg)
  multihost.initialize(cfg.mesh)  # before anything touches a device
  validate_devices(cfg)
  if cfg.compilation_cache:
    # Calibration compiles the same programs for every block: reuse them, across runs too.
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if multihost.is_writer():
    return _run(cfg, pipe)
  print(f"process {jax.process_index()} of {jax.process_count()}: process 0 logs and writes "
        "the workdir", flush=True)
  with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
    _run(cfg, pipe)
  return None


def _run(cfg: ConfigDict, pipe: pipeline_lib.Pipeline | None) -> dict[str, Any] | None:
  # Fails fast, but creates nothing yet.
  multihost.on_writer(lambda: workdir_lib.probe_writable(cfg.workdir))
  stage = _Stages()
  with stage("load", "loading model"):
    model, folder, model_name = load_model(cfg)
    prompt_sets = _prompt_sets(cfg, pipe)
    if pipe is None:
      if not conditions_lib.has_conditions(folder):
        print("note: without a pipeline folder there is no text encoder, so the videos are "
              "conditioned on random stand-in prompts; for real prompts pass the pipeline folder "
              "(the one with model_index.json) as --config.model.path", flush=True)
      noise, cond, uncond, names, cfg_scale = eval_inputs(cfg, model, folder)
    else:  # the prompts are embedded below, once the workdir that caches them exists
      pipe.latent_size(cfg.eval.frames, cfg.eval.height, cfg.eval.width)
      folder = pipe.root  # its digest covers the text encoder, VAE and scheduler as well
    try:
      rules = quant.rules_from_config(cfg.quant, model.quant_defaults())
    except ValueError as e:
      raise UserError(f"quant config: {e}") from None
    try:
      scheduler = scheduler_for(cfg.sampler.scheduler, folder, cfg.sampler.num_steps,
                                model.default_scheduler_config())
    except ValueError as e:
      raise UserError(f"sampler.scheduler: {e}") from None
    # Only now, with the inputs known good, does the workdir come into being.
    run_fingerprint = _fingerprint(cfg, folder, prompt_sets)
    workdir = os.path.abspath(cfg.workdir)
    multihost.on_writer(lambda: workdir_lib.open_workdir(workdir, run_fingerprint))
  prompts = {}
  if pipe is not None:
    with stage("prompts", f"embedding {sum(map(len, prompt_sets.values()))} prompts"):
      prompts = pipeline_lib.embed(
          pipe, prompt_sets, max_length=model.config.max_text_seq_length,
          dtype=cfg.model.dtype, cache_path=os.path.join(workdir, pipeline_lib.CACHE_NAME))
    noise, cond, uncond, names, cfg_scale = eval_inputs(cfg, model, folder, prompts["eval"],
                                                        pipe)
  # The per-step noise of a stochastic scheduler: video i draws from fold_in(key, i).
  gen = dict(num_steps=cfg.sampler.num_steps, guidance_scale=cfg_scale,
             scheduler=scheduler, key=jax.random.fold_in(jax.random.key(cfg.seed), 1),
             mesh=generation_mesh(cfg))
  with stage("fp_generation", f"generating {len(noise)} full-precision videos"):
    fp_videos = _fp_videos(cfg, model, folder, noise, cond, uncond, gen)
  fp_bytes = multihost.on_writer(lambda: _bf16_file_bytes(model, workdir))
  calibrator = CALIBRATORS[cfg.method]
  fp_model = nnx.clone(model) if calibrator else None
  with stage("quantization", f"quantizing ({cfg.method}, W{cfg.quant.w_bits}A{cfg.quant.a_bits})"):
    layers = quant.quantize_model(model, rules)
    # Evaluate exactly what is deployed: the checkpoint stores unquantized layers in bf16.
    deploy.round_fp_params(model)
  calibration = None
  if calibrator:
    with stage("pool", f"building the calibration pool ({cfg.calib.num_prompts} prompts × "
               f"{cfg.sampler.num_steps} steps)"):
      pool = _calibration_pool(cfg, fp_model, folder, workdir, scheduler, prompts.get("calib"),
                               pipe)
    with stage("calibration", f"calibrating ({cfg.method})"):
      mesh = sharding.make_mesh(cfg.mesh.model)
      try:
        calibration = calibrator(model, fp_model, pool, cfg, workdir, mesh)
      except ValueError as e:
        raise UserError(f"{cfg.method}: {e}") from None
    del fp_model
  quant.freeze_all(model)
  backend = cfg.inference.backend
  export_dir = os.path.join(workdir, "quantized_model")
  with stage("export", "exporting the quantized checkpoint"):
    quant_bytes = multihost.on_writer(lambda: _export(model, export_dir))
  with stage("quant_generation", f"generating {len(noise)} quantized videos"
             + (f" from the exported checkpoint ({backend} kernels)" if backend else "")):
    with _deployed(model, export_dir, backend) as q_model:
      q_videos = _generate(q_model, noise, cond, uncond, label="quantized", **gen)
    finite.check_arrays("quantized generation", {"videos": q_videos},
                        "the quantized model overflows; try more bits or another method")

  def finish() -> dict[str, Any]:
    with stage("evaluation", "evaluating and writing videos"):
      fp, q = fp_videos, q_videos
      if pipe is not None:  # metrics and files on pixels
        fp, q = pipeline_lib.decode(pipe, [fp_videos, q_videos], cfg.model.dtype)
      per_video = metrics.per_video(fp, q)
      scores = metrics.means(per_video)
      finite.check_metrics(scores)
      videos, mp4s = [], []
      for i, name in enumerate(names):
        gif_path, *mp4 = pipeline_lib.write_side_by_side(
            os.path.join(workdir, "videos", f"{i:02d}_{_slug(name)}"), [fp[i], q[i]],
            scale=cfg.eval.gif_scale, fps=pipeline_lib.FPS if pipe else gif.DEFAULT_FPS)
        videos.append(gif_path)
        mp4s += mp4
    report = {
        "method": cfg.method, "w_bits": cfg.quant.w_bits, "a_bits": cfg.quant.a_bits,
        "model": model_name, "metrics": scores,
        "metrics_standard_error": metrics.standard_errors(per_video),
        "metrics_per_video": {k: v.tolist() for k, v in per_video.items()},
        "size": {"fp_bytes": fp_bytes, "quant_bytes": quant_bytes,
                 "compression": fp_bytes / quant_bytes},
        "checkpoint": export_dir,
        "inference_backend": backend or "fake_quant (frozen integer codes, XLA)",
        "timing": stage.timing,
        "layers": {"quantized": [l.path for l in layers if l.quantized],
                   "full_precision": [l.path for l in layers if not l.quantized]},
        "eval": {"num_videos": len(noise), "num_steps": cfg.sampler.num_steps,
                 "guidance_scale": cfg.sampler.guidance_scale,
                 "classifier_free_scale": cfg_scale,  # 1: no null-prompt pass
                 "seed": cfg.seed,
                 "scheduler": type(scheduler).__name__, "conditions": names,
                 "video_shape": list(fp.shape[1:]), "pixels": pipe is not None},
        "videos": videos, **({"mp4": mp4s} if mp4s else {}),
        "calibration": calibration,
        "fingerprint": run_fingerprint,  # `compare` reruns a finished run whose settings differ
    }
    json_path, md_path = report_lib.write_report(workdir, report)
    print("\n" + report_lib.summary_table(report))
    print(f"\nreport: {json_path}\n        {md_path}\nvideos: {os.path.dirname(videos[0])}/ "
          "(left: full precision, right: quantized)")
    return report

  return multihost.on_writer(finish)


def _generate(model, noise: np.ndarray, cond: np.ndarray, uncond: np.ndarray, key=None,
              **kwargs) -> np.ndarray:
  """All the videos, on every process; with several processes each generates its share."""
  lo, hi = multihost.share_of(len(noise))
  keys = None if key is None else sample_keys(key, len(noise))[lo:hi]
  if hi > lo:
    part = generate(model, noise[lo:hi], cond[lo:hi], uncond, key=keys, **kwargs)
  else:
    part = np.zeros((0,) + noise.shape[1:], np.float32)
  return multihost.gather(part, len(noise))


@contextlib.contextmanager
def _deployed(model, export_dir: str, backend: str):
  """The model quantized videos come from: in memory, or the exported checkpoint on `backend`.

  Processes other than 0 cannot read the workdir: they export their own (identical)
  copy to a temporary folder and load that.
  """
  if not backend:
    yield model
  elif multihost.is_writer():
    yield load_pretrained(export_dir, backend=backend)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      deploy.export_quantized(model, tmp)
      yield load_pretrained(tmp, backend=backend)


def _export(model, export_dir: str) -> int:
  """Writes the quantized checkpoint; its weights file's size in bytes."""
  with atomic_output_dir(export_dir, overwrite=True) as tmp:
    deploy.export_quantized(model, tmp)
  return deploy.weights_file_bytes(export_dir)


def _cache_key(cfg: ConfigDict, folder: str, prefixes: tuple[str, ...], **extra) -> dict:
  """A cache's fingerprint: the model files, the code and the settings under `prefixes`."""
  return {"model files": fingerprint.model_digest(folder), "code": fingerprint.code_version(),
          **{k: v for k, v in fingerprint.settings(cfg).items() if k.startswith(prefixes)},
          **extra}


def _fp_videos(cfg: ConfigDict, model, folder: str, noise, cond, uncond, gen: dict):
  """The full-precision videos, from `eval.fp_videos_path` when it holds these very ones."""
  path = os.path.expanduser(cfg.eval.fp_videos_path)
  key = _cache_key(cfg, folder, ("seed", "model.", "sampler."), shape=list(noise.shape),
                   conditions=_digest(cond, uncond))
  cached = multihost.on_writer(lambda: outputs.load_npz(path, key))
  if multihost.share_json(cached is not None):
    return None if cached is None else cached["videos"]  # only process 0 evaluates
  videos = _generate(model, noise, cond, uncond, label="full precision", **gen)
  finite.check_arrays("full-precision generation", {"videos": videos},
                      "the model's activations overflow; try --config.model.dtype=float32")
  if path:
    multihost.on_writer(lambda: outputs.save_npz(path, {"videos": videos}, key))
  return videos


def _calibration_pool(cfg: ConfigDict, fp_model, folder: str, workdir: str, scheduler=None,
                      prompts: pipeline_lib.Conditions | None = None,
                      pipe: pipeline_lib.Pipeline | None = None) -> pool_lib.Pool:
  """The FP sampler's trajectories on calibration prompts, cached in the workdir."""
  path = os.path.expanduser(cfg.calib.pool_path) or os.path.join(workdir, "pool.npz")
  # What the pool depends on: the selection and training keys are not among them, so
  # methods and ablations that differ only there share one pool (code changes count).
  key = _cache_key(cfg, folder, ("seed", "model.", "sampler.", "calib.num_prompts",
                                 "eval.frames", "eval.height", "eval.width"),
                   **({} if prompts is None else {"prompts": prompts.prompts}))
  cached = multihost.share_arrays(multihost.on_writer(lambda: outputs.load_npz(path, key)))
  if cached is not None and "guidance_scale" in cached:  # else written by an older version
    return pool_lib.Pool(**cached)
  calib = cfg.copy_and_resolve_references()
  calib.eval.num_videos = cfg.calib.num_prompts
  calib.seed = cfg.seed + 1  # calibration noise differs from evaluation noise
  noise, cond, uncond, _, cfg_scale = eval_inputs(calib, fp_model, folder, prompts, pipe)
  pool = pool_lib.build_pool(fp_model, cond, uncond, noise, num_steps=cfg.sampler.num_steps,
                             guidance_scale=cfg_scale, scheduler=scheduler,
                             key=jax.random.fold_in(jax.random.key(calib.seed), 1))
  finite.check_arrays("calibration pool (full-precision sampler)",
                      {f.name: getattr(pool, f.name) for f in dataclasses.fields(pool)},
                      "the model's activations overflow; try --config.model.dtype=float32")
  multihost.on_writer(lambda: outputs.save_npz(path, dataclasses.asdict(pool), key))
  return pool


def _bf16_file_bytes(model, workdir: str) -> int:
  """Size on disk of the model's weights file saved in bf16 (diffusers safetensors).

  Both sides of `size.compression` are weight files with their headers; neither
  counts config.json.
  """
  folder = os.path.join(workdir, ".fp_bf16_size_probe")
  try:
    with atomic_output_dir(folder, overwrite=True) as tmp:
      save_diffusers(model, tmp, dtype="bfloat16")
  except Exception as e:  # pylint: disable=broad-except
    if (reason := outputs.write_failure(e)) is None:
      raise
    raise UserError(f"cannot write {folder}: {reason}") from None
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
             if f.endswith(".safetensors"))
  shutil.rmtree(folder)
  return size


def run_fingerprint(cfg: ConfigDict) -> dict[str, Any]:
  """The fingerprint a run of `cfg` stores in its workdir and report (see `fingerprint`)."""
  cfg, pipe = pipeline_lib.resolve(cfg)
  folder = pipe.root if pipe else cfg.model.path or embedded.path()
  return _fingerprint(cfg, folder, _prompt_sets(cfg, pipe))


def _fingerprint(cfg: ConfigDict, folder: str, prompt_sets: dict[str, list[str]]) -> dict:
  """Resolved settings, model (or whole pipeline) files, code, and the prompts themselves."""
  return {**fingerprint.of_run(cfg, folder),
          **{f"{name} prompts": prompts for name, prompts in prompt_sets.items()}}


def _prompt_sets(cfg: ConfigDict, pipe: pipeline_lib.Pipeline | None) -> dict[str, list[str]]:
  return {} if pipe is None else pipeline_lib.prompt_sets(cfg, bool(CALIBRATORS[cfg.method]))


def _digest(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a, np.float32).tobytes())
  return h.hexdigest()[:16]


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]
