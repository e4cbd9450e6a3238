"""Issue #15: a reused workdir or cache never mixes settings; bad weights and NaN never pass silently."""
import json
import os

import numpy as np
import pytest

from integrity_helpers import model_copy, tiny_config
from s2q_jax import compare, embedded, finite, fingerprint, job, outputs
from s2q_jax.calibration import pool as pool_lib
from s2q_jax.errors import UserError
from s2q_jax.models import load_pretrained
from s2q_jax.models.config import MissingConfigFieldWarning
from s2q_jax.models.loading import read_config


def _strict_load(path):
  def refuse(name):
    raise AssertionError(f"{path} holds {name}, which strict JSON parsers reject")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny W4A6 run, shared by the tests that reuse its workdir."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  report = job.run(tiny_config(workdir))
  return workdir, report


@pytest.mark.parametrize("key,value,says", [
    ("quant.w_bits", 5, "quant.w_bits=4 (now 5)"),
    ("quant.w_bits", 3, "quant.w_bits=4 (now 3)"),
    ("sampler.num_steps", 6, "sampler.num_steps=2 (now 6)"),
])
def test_workdir_of_other_settings_stops_naming_the_difference(finished, key, value, says):
  workdir, _ = finished
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError) as e:
    job.run(tiny_config(workdir, **{key: value}))
  assert f"workdir {workdir} holds a run with {says}" in str(e.value)
  assert "use another --config.workdir or delete" in str(e.value)
  assert sorted(os.listdir(workdir)) == before  # nothing was written into it


def test_workdir_without_fingerprint_stops(tmp_path):
  (tmp_path / "calibration").mkdir()  # state left by a version without fingerprints
  with pytest.raises(UserError, match="holds a run without a fingerprint"):
    job.run(tiny_config(tmp_path))


def test_report_is_strict_json_with_its_fingerprint(finished):
  workdir, report = finished
  stored = _strict_load(workdir / "report.json")
  assert stored["fingerprint"] == job.run_fingerprint(tiny_config(workdir))
  assert stored["fingerprint"]["quant.w_bits"] == 4 and "workdir" not in stored["fingerprint"]
  assert _strict_load(workdir / "fingerprint.json") == stored["fingerprint"]
  assert np.isfinite(report["metrics"]["psnr"])


def test_strict_json_turns_inf_to_null_and_refuses_nan(tmp_path):
  outputs.write_json(str(tmp_path / "r.json"), {"psnr": float("inf"), "x": [1.0]})
  assert _strict_load(tmp_path / "r.json") == {"psnr": None, "x": [1.0]}
  with pytest.raises(UserError, match=r"NaN at n\.json\.m\[1\]"):
    outputs.write_json(str(tmp_path / "n.json"), {"m": [1.0, float("nan")]})
  assert not os.path.exists(tmp_path / "n.json")


def test_pool_cache_is_rebuilt_when_model_or_sampler_differ(tmp_path, capsys):
  path = str(tmp_path / "pool.npz")
  model = load_pretrained(embedded.path())
  cfg = tiny_config(tmp_path, **{"calib.pool_path": path})
  first = job._calibration_pool(cfg, model, embedded.path(), str(tmp_path))
  assert len(first) == 2  # 1 prompt × 2 steps
  again = job._calibration_pool(cfg, model, embedded.path(), str(tmp_path))
  assert "reusing" in capsys.readouterr().out
  np.testing.assert_array_equal(again.latents, first.latents)
  more_steps = tiny_config(tmp_path, **{"calib.pool_path": path, "sampler.num_steps": 3})
  assert len(job._calibration_pool(more_steps, model, embedded.path(), str(tmp_path))) == 3
  assert "sampler.num_steps=2 (now 3); recomputing" in capsys.readouterr().out
  # A NaN pool (from a bad model) must not survive pointing at a good model: the key has
  # the model files' digest, so a model whose files differ rebuilds it.
  other = model_copy(tmp_path / "other", lambda t: t.update(
      {"proj_out.bias": t["proj_out.bias"] + 0.01}))
  job._calibration_pool(more_steps, model, other, str(tmp_path))
  assert "other model files" in capsys.readouterr().out


def test_pool_cache_without_its_guidance_scale_is_recomputed(tmp_path, capsys):
  """A pool written before it recorded its sampler's guidance scale (same key otherwise)
  is rebuilt, not read with a guessed scale: the scale decides the null-prompt twins."""
  path = str(tmp_path / "pool.npz")
  model = load_pretrained(embedded.path())
  cfg = tiny_config(tmp_path, **{"calib.pool_path": path})
  first = job._calibration_pool(cfg, model, embedded.path(), str(tmp_path))
  with np.load(path) as f:
    key = json.loads(str(f["key"]))
    arrays = {k: f[k] for k in f.files if k not in ("key", "guidance_scale")}
  outputs.save_npz(path, arrays, key)
  capsys.readouterr()
  again = job._calibration_pool(cfg, model, embedded.path(), str(tmp_path))
  assert "reusing" in capsys.readouterr().out  # the key matched; the missing field did not
  assert again.guidance_scale == first.guidance_scale
  with np.load(path) as f:
    assert "guidance_scale" in f.files  # and the cache was written again, complete


def test_nonfinite_pool_is_refused_and_not_cached(tmp_path, monkeypatch):
  def nan_pool(*args, **kwargs):
    return pool_lib.Pool(latents=np.full((2, 1), np.nan), previous=np.zeros((2, 1)),
                         timesteps=np.zeros(2), steps=np.zeros(2, int), x0_change=np.zeros(2),
                         conditions=np.zeros((2, 1)), null_condition=np.zeros(1),
                         guidance_scale=5.0)
  monkeypatch.setattr(pool_lib, "build_pool", nan_pool)
  path = str(tmp_path / "pool.npz")
  cfg = tiny_config(tmp_path, **{"calib.pool_path": path})
  with pytest.raises(UserError, match=r"calibration pool \(full-precision sampler\) produced "
                                      r"non-finite values \(NaN or Inf\) in latents"):
    job._calibration_pool(cfg, load_pretrained(embedded.path()), embedded.path(), str(tmp_path))
  assert not os.path.exists(path)


def test_nonfinite_fp_videos_stop_and_are_not_cached(tmp_path, monkeypatch):
  monkeypatch.setattr(job, "generate", lambda *a, **k: np.full((2, 8, 3, 32, 32), np.nan))
  cache = tmp_path / "fp.npz"
  with pytest.raises(UserError, match="full-precision generation produced non-finite"):
    job.run(tiny_config(tmp_path / "w", **{"eval.fp_videos_path": str(cache)}))
  assert not cache.exists()


def test_nonfinite_metrics_stop_naming_them():
  finite.check_metrics({"psnr": float("inf"), "ssim": 0.5, "temporal_consistency": 1.0})
  with pytest.raises(UserError, match="non-finite metrics: psnr, ssim"):
    finite.check_metrics({"psnr": float("nan"), "ssim": float("nan"), "temporal_consistency": 1.})


@pytest.mark.parametrize("key,edit,named", [
    ("transformer_blocks.0.attn1.to_q.weight", lambda a: a.flat.__setitem__(7, np.nan),
     "transformer_blocks.0.attn1.to_q.kernel"),
    ("transformer_blocks.2.ff.net.0.proj.weight", lambda a: a.fill(np.inf),
     "transformer_blocks.2.ff.proj_in.kernel"),
    ("proj_out.weight", lambda a: a.fill(np.nan), "proj_out.kernel"),
])
def test_nonfinite_weights_are_named_at_load(tmp_path, key, edit, named):
  folder = model_copy(tmp_path / "bad", lambda t: edit(t[key]))
  workdir = tmp_path / "new" / "run"
  with pytest.raises(UserError) as e:
    job.run(tiny_config(workdir, **{"model.path": folder}))
  assert "has NaN or Inf weights in 1 tensor: " in str(e.value) and named in str(e.value)
  assert not (tmp_path / "new").exists()  # no workdir for a model that failed to load


def test_nonfinite_weights_in_converted_checkpoint(tmp_path):
  from s2q_jax.models.loading import save_model  # pylint: disable=import-outside-toplevel
  model = load_pretrained(embedded.path())
  model.proj_out.bias[...] = model.proj_out.bias[...].at[0].set(np.inf)
  save_model(model, str(tmp_path / "conv"))
  with pytest.raises(ValueError, match=r"NaN or Inf weights in 1 tensor: proj_out\.bias"):
    load_pretrained(str(tmp_path / "conv"))


def test_config_json_missing_a_field_warns_with_the_default(tmp_path):
  folder = model_copy(tmp_path / "m")
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    config = json.load(f)
  del config["use_rotary_positional_embeddings"], config["sample_width"]
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.warns(MissingConfigFieldWarning) as record:
    read_config(folder)
  message = str(record[0].message)
  assert "sample_width, use_rotary_positional_embeddings" in message
  assert "sample_width=90" in message and "use_rotary_positional_embeddings=False" in message
  assert "diffusers fills the same defaults" in message


def test_complete_config_json_does_not_warn(recwarn):
  read_config(embedded.path())
  assert not [w for w in recwarn if issubclass(w.category, MissingConfigFieldWarning)]


def test_compare_reruns_a_finished_run_whose_settings_differ(tmp_path, monkeypatch):
  ran = []

  def fake_run(cfg):  # writes what job.run would leave, without the minutes of work
    ran.append(cfg.workdir)
    os.makedirs(cfg.workdir)
    outputs.write_json(os.path.join(cfg.workdir, "report.json"), {
        "fingerprint": job.run_fingerprint(cfg), "metrics": {}})
  monkeypatch.setattr(job, "run", fake_run)
  variants = {"rtn": ("rtn", {})}
  compare.run_grid(str(tmp_path), ["w4a6"], variants)
  compare.run_grid(str(tmp_path), ["w4a6"], variants)
  assert len(ran) == 1  # same settings: reused
  steps = lambda cfg: setattr(cfg.sampler, "num_steps", 6)  # noqa: E731
  compare.run_grid(str(tmp_path), ["w4a6"], variants, steps)
  assert len(ran) == 2  # other settings: run again, into a clean folder
  with open(tmp_path / "seed0" / "w4a6_rtn" / "report.json") as f:
    report = json.load(f)
  report.pop("fingerprint")  # a report from before fingerprints
  outputs.write_json(str(tmp_path / "seed0" / "w4a6_rtn" / "report.json"), report)
  compare.run_grid(str(tmp_path), ["w4a6"], variants, steps)
  assert len(ran) == 3
