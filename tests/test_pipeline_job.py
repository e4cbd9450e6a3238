"""The main job on a diffusers CogVideoX pipeline folder, against `CogVideoXPipeline` itself.

One tiny random pipeline (transformer, VAE, T5 with a tokenizer trained here,
CogVideoX-2B's DDIM scheduler) is built and saved once per module; the job
runs on the saved folder and its full-precision video, decoded to pixels,
is compared with what diffusers' pipeline makes from the same initial latents.
"""
import io
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

from s2q_jax import job, pipeline
from s2q_jax.errors import UserError
from s2q_jax.job_config import base_config
from s2q_jax.sampling.scheduler_config import COGVIDEOX_2B_CONFIG

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

PROMPTS = ["A red fox runs across the snow.", "Waves roll onto a sandy beach at sunset."]
TRAINING_TEXT = ["A cat plays with a ball of yarn on a wooden floor.",
                 "Time-lapse of clouds drifting over snowy mountains at dawn.",
                 "An astronaut rides a horse on the moon, cinematic light."]
TEXT_LENGTH = 8  # the transformer's max_text_seq_length: the prompts' token budget
# Latents 3 × 4 × 4 (3 frames decode to 9 in one VAE batch), 16 × 16 pixels.
TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                   time_embed_dim=16, text_embed_dim=16, num_layers=2, sample_width=4,
                   sample_height=4, sample_frames=9, patch_size=2,
                   max_text_seq_length=TEXT_LENGTH)
VAE = dict(block_out_channels=(8, 8, 16), latent_channels=4, layers_per_block=0,
           norm_num_groups=2, temporal_compression_ratio=4, sample_height=16, sample_width=16)
T5 = dict(d_model=16, d_kv=8, num_heads=2, d_ff=24, num_layers=1,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          feed_forward_proj="gated-gelu", vocab_size=180)


def _perturbed(model, scale=0.1, seed=0):
  """Random weights everywhere: zero-initialised layers would hide wrong wiring."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """(saved pipeline folder, the diffusers pipeline it was saved from)."""
  spm_dir = tmp_path_factory.mktemp("spiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter((PROMPTS + TRAINING_TEXT) * 20), model_writer=model, vocab_size=48,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  (spm_dir / "spiece.model").write_bytes(model.getvalue())
  blocks = len(VAE["block_out_channels"])
  pipe = diffusers.CogVideoXPipeline(
      tokenizer=transformers.T5Tokenizer.from_pretrained(spm_dir),
      text_encoder=_perturbed(transformers.T5EncoderModel(
          transformers.T5Config(is_encoder_decoder=False, **T5)), 0.2),
      vae=_perturbed(diffusers.AutoencoderKLCogVideoX(
          down_block_types=("CogVideoXDownBlock3D",) * blocks,
          up_block_types=("CogVideoXUpBlock3D",) * blocks, **VAE), 0.1),
      transformer=_perturbed(diffusers.CogVideoXTransformer3DModel(**TRANSFORMER), 0.05),
      scheduler=diffusers.CogVideoXDDIMScheduler.from_config(COGVIDEOX_2B_CONFIG))
  folder = tmp_path_factory.mktemp("pipeline") / "tiny-cogvideox"
  pipe.save_pretrained(folder)
  return str(folder), pipe


def _config(folder, workdir, method="rtn", **flat):
  cfg = base_config(4, 6, method)
  cfg.model.path, cfg.workdir, cfg.compilation_cache = folder, str(workdir), ""
  cfg.eval.num_videos, cfg.sampler.num_steps = 2, 2
  cfg.calib.num_prompts, cfg.calib.num_samples = 1, 2
  cfg.distill.epochs, cfg.distill.batch_size = 1, 2
  for key, value in flat.items():
    section, leaf = key.split(".")
    cfg[section][leaf] = value
  return cfg


def _prompt_file(tmp_path, lines, name="prompts.txt"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


class _Spy:
  """Records the first call's arguments and every return value of a function."""

  def __init__(self, monkeypatch, owner, name):
    self.fn, self.calls, self.results = getattr(owner, name), [], []
    monkeypatch.setattr(owner, name, self)

  def __call__(self, *args, **kwargs):
    self.calls.append((args, kwargs))
    self.results.append(self.fn(*args, **kwargs))
    return self.results[-1]


def test_fp_video_equals_the_diffusers_pipeline(pipeline_dir, tmp_path, monkeypatch):
  folder, pipe = pipeline_dir
  generate = _Spy(monkeypatch, job, "generate")
  decode = _Spy(monkeypatch, pipeline, "decode")
  cfg = _config(folder, tmp_path / "w", **{"eval.prompts": _prompt_file(tmp_path, PROMPTS)})
  report = job.run(cfg)

  noise = generate.calls[0][0][1]  # the full-precision run's initial latents
  assert noise.shape == (2, 3, 4, 4, 4)
  fp_pixels = decode.results[0][0]  # (videos, frames, channels, height, width) in [-1, 1]
  with torch.no_grad():
    expected = pipe(prompt=PROMPTS, num_frames=9, height=16, width=16, num_inference_steps=2,
                    guidance_scale=6.0, latents=torch.from_numpy(np.array(noise)),
                    output_type="np", max_sequence_length=TEXT_LENGTH).frames
  # The pipeline's "np" output: (videos, frames, height, width, channels) in [0, 1].
  ours = np.clip((fp_pixels.transpose(0, 1, 3, 4, 2) + 1) / 2, 0, 1)
  assert ours.shape == expected.shape == (2, 9, 16, 16, 3)
  err = float(np.abs(ours - expected).max())
  print(f"FP video vs diffusers CogVideoXPipeline: max abs error {err:.2e} (values in [0, 1])")
  assert err <= 1e-3, err
  assert np.std(expected) > 0.01  # a real video, not a constant

  assert report["eval"]["conditions"] == PROMPTS
  assert report["eval"]["guidance_scale"] == 6.0  # CogVideoXPipeline's default
  assert report["eval"]["video_shape"] == [9, 3, 16, 16] and report["eval"]["pixels"]
  assert report["eval"]["scheduler"] == "DDIMSchedule"
  assert np.isfinite(report["metrics"]["psnr"]) and 0 < report["metrics"]["ssim"] <= 1
  assert [os.path.basename(v) for v in report["videos"]] == [
      "00_a_red_fox_runs_across_the_snow.gif", "01_waves_roll_onto_a_sandy_beach_at_sunset.gif"]
  if pipeline.mp4_available():
    assert all(p.endswith(".mp4") and os.path.getsize(p) > 0 for p in report["mp4"])
  assert os.path.isfile(tmp_path / "w" / pipeline.CACHE_NAME)


def test_the_bfloat16_pipeline_job_stays_near_diffusers_float32(pipeline_dir, tmp_path,
                                                                monkeypatch):
  """The README's real-model command runs in bfloat16: T5, transformer and VAE all in it."""
  folder, pipe = pipeline_dir
  generate = _Spy(monkeypatch, job, "generate")
  decode = _Spy(monkeypatch, pipeline, "decode")
  report = job.run(_config(folder, tmp_path / "w", **{
      "eval.prompts": _prompt_file(tmp_path, PROMPTS), "model.dtype": "bfloat16"}))
  noise = np.array(generate.calls[0][0][1], np.float32)  # a writable copy for torch
  with torch.no_grad():
    expected = pipe(prompt=PROMPTS, num_frames=9, height=16, width=16, num_inference_steps=2,
                    guidance_scale=6.0, latents=torch.from_numpy(noise),
                    output_type="np", max_sequence_length=TEXT_LENGTH).frames
  ours = np.clip((decode.results[0][0].transpose(0, 1, 3, 4, 2) + 1) / 2, 0, 1)
  err = float(np.abs(ours - expected).mean())
  print(f"bfloat16 FP video vs diffusers float32: mean abs error {err:.2e}")
  assert err <= 2e-2, err  # bf16 rounding through T5, 2 steps and the VAE; not a wrong layer
  assert all(np.isfinite(v) for v in report["metrics"].values())


def test_prompt_embeddings_are_the_pipelines_and_cached(pipeline_dir, tmp_path, capsys):
  folder, pipe = pipeline_dir
  opened, cache = pipeline.open_pipeline(folder), str(tmp_path / "embeddings.npz")
  embed = lambda sets: pipeline.embed(opened, sets, max_length=TEXT_LENGTH,  # noqa: E731
                                      dtype="float32", cache_path=cache)
  got = embed({"eval": PROMPTS, "calib": PROMPTS[:1]})
  with torch.no_grad():
    cond, null = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                    max_sequence_length=TEXT_LENGTH)
  np.testing.assert_allclose(got["eval"].embeddings, cond.numpy(), atol=1e-5)
  np.testing.assert_allclose(got["eval"].null, null[0].numpy(), atol=1e-5)
  np.testing.assert_array_equal(got["calib"].embeddings, got["eval"].embeddings[:1])
  assert "encoding 4 prompts" in capsys.readouterr().out
  again = embed({"eval": PROMPTS, "calib": PROMPTS[:1]})
  assert f"reusing {cache}" in capsys.readouterr().out
  np.testing.assert_array_equal(again["eval"].embeddings, got["eval"].embeddings)
  embed({"eval": PROMPTS[::-1]})
  out = capsys.readouterr().out
  assert "recomputing" in out and "encoding 3 prompts" in out


def test_s2q_runs_on_the_pipeline(pipeline_dir, tmp_path):
  folder, _ = pipeline_dir
  # The calibration prompts' pool and the salient selection run; training is covered by
  # test_s2q.py, and left out here to keep the test short.
  report = job.run(_config(folder, tmp_path / "w", "s2q", **{
      "eval.frames": 5, "eval.height": 8, "eval.width": 8, "sampler.guidance_scale": 3.0,
      "sampler.scheduler": "CogVideoXDPMScheduler", "distill.enabled": False}))
  assert sum(report["calibration"]["selection"]["step_histogram"]) == 2
  assert report["eval"]["video_shape"] == [8, 3, 8, 8]  # 2 latent frames decode to 8
  assert report["eval"]["guidance_scale"] == 3.0 and report["eval"]["scheduler"] == (
      "CogVideoXDPMSchedule")
  assert all(np.isfinite(v) for v in report["metrics"].values())


def test_unset_settings_take_the_pipelines_and_explicit_ones_win(pipeline_dir, tmp_path):
  folder, _ = pipeline_dir
  cfg = base_config(4, 6, "rtn")
  cfg.model.path = folder
  resolved, pipe = pipeline.resolve(cfg)
  assert pipe is not None and pipe.root == folder
  assert (resolved.eval.frames, resolved.eval.height, resolved.eval.width) == (9, 16, 16)
  assert (resolved.sampler.num_steps, resolved.sampler.guidance_scale) == (50, 6.0)
  assert cfg.sampler.num_steps is None  # the user's config is not changed
  cfg.sampler.num_steps, cfg.eval.height = 3, 8
  resolved, _ = pipeline.resolve(cfg)
  assert (resolved.sampler.num_steps, resolved.eval.height) == (3, 8)
  # Without a pipeline: the latent-space defaults the job always had.
  cfg.model.path = os.path.join(folder, "transformer")
  resolved, pipe = pipeline.resolve(base_config(4, 6, "rtn"))
  assert pipe is None and (resolved.eval.frames, resolved.sampler.num_steps) == (8, 25)


def _broken_copy(folder, tmp_path, edit):
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  edit(broken)
  return str(broken)


def _drop_index_entry(name):
  def edit(folder):
    index = json.loads((folder / "model_index.json").read_text())
    del index[name]
    (folder / "model_index.json").write_text(json.dumps(index))
  return edit


@pytest.mark.parametrize("edit,message", [
    (_drop_index_entry("vae"), r"lists no 'vae' component \(needed for decoding videos"),
    (lambda f: shutil.rmtree(f / "text_encoder"), "has no text_encoder/ folder although"),
    (lambda f: (f / "model_index.json").write_text('{"_class_name": "WanPipeline"}'),
     "pipeline class 'WanPipeline' is not supported"),
])
def test_incomplete_pipeline_folders_are_named(pipeline_dir, tmp_path, edit, message):
  cfg = _config(_broken_copy(pipeline_dir[0], tmp_path, edit), tmp_path / "w")
  with pytest.raises(UserError, match=message):
    job.run(cfg)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("setting,lines,message", [
    ("eval.prompts", None, r"eval.prompts='.*missing.txt': no such file"),
    ("eval.prompts", ["", "# only a comment", "  "], "holds no prompts"),
    ("eval.prompts", ["one prompt"], "holds 1 prompts but eval.num_videos=2 asks for 2: add "
                                     "prompts or lower eval.num_videos"),
    ("calib.prompts", [], "calib.prompts=.* holds no prompts"),
])
def test_bad_prompt_files_are_refused(pipeline_dir, tmp_path, setting, lines, message):
  path = str(tmp_path / "missing.txt") if lines is None else _prompt_file(tmp_path, lines)
  with pytest.raises(UserError, match=message):
    job.run(_config(pipeline_dir[0], tmp_path / "w", "s2q", **{setting: path}))
  assert not os.path.exists(tmp_path / "w")


def test_sizes_the_vae_cannot_make_and_prompts_without_a_pipeline(pipeline_dir, tmp_path):
  folder = pipeline_dir[0]
  with pytest.raises(UserError, match=r"eval.frames=8: the VAE decodes 4·k \+ 1 frames; use 5 "
                                      "or 9"):
    job.run(_config(folder, tmp_path / "w", **{"eval.frames": 8}))
  with pytest.raises(UserError, match="eval.width=12 must be a multiple of 8 .* use 8 or 16"):
    job.run(_config(folder, tmp_path / "w", **{"eval.width": 12}))
  with pytest.raises(UserError, match="eval.prompts needs a pipeline folder .* pass the "
                                      "pipeline folder as --config.model.path"):
    job.run(_config(os.path.join(folder, "transformer"), tmp_path / "w",
                    **{"eval.prompts": _prompt_file(tmp_path, PROMPTS)}))
  with pytest.raises(UserError, match="sampler.scheduler: unknown scheduler 'euler'"):
    job.run(_config(folder, tmp_path / "w", **{"sampler.scheduler": "euler"}))
  assert not os.path.exists(tmp_path / "w")


def test_side_by_side_files_gif_always_mp4_when_ffmpeg_is_there(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  videos = [np.clip(rng.standard_normal((5, 3, 7, 9)), -1, 1) for _ in range(2)]  # odd sizes
  monkeypatch.setattr(pipeline.videos, "mp4_available", lambda: False)
  assert pipeline.write_side_by_side(str(tmp_path / "a"), videos, scale=1) == [
      str(tmp_path / "a.gif")]
  monkeypatch.undo()
  imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
  gif_path, mp4_path = pipeline.write_side_by_side(str(tmp_path / "b"), videos, scale=1)
  reader = imageio_ffmpeg.read_frames(mp4_path)
  meta = reader.__next__()
  frames = list(reader)
  # 2 panels of 9 px and a 2 px gap: 20 × 7, padded to an even 20 × 8 for yuv420p.
  assert tuple(meta["size"]) == (20, 8) and len(frames) == 5
  assert os.path.getsize(gif_path) > 0 and not list(tmp_path.glob("*partial*"))


def test_writing_an_mp4_does_not_fork_the_process(tmp_path):
  """ffmpeg is spawned, not started through a fork of this multithreaded JAX process
  (JAX warns on every fork, and a fork of a threaded process can deadlock)."""
  pytest.importorskip("imageio_ffmpeg")
  jax.numpy.ones(2).block_until_ready()  # JAX's threads are up
  forks = []
  os.register_at_fork(before=lambda: forks.append(1))
  videos = [np.zeros((2, 3, 8, 8))]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    pipeline.write_side_by_side(str(tmp_path / "v"), videos, scale=1)
  assert not forks and os.environ.get("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT") is None
