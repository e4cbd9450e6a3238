"""The embedded model's trainer: export of the EMA weights, a wall-time stop that resumes."""
import importlib.util
import itertools
import os

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conversion.flax_to_diffusers import save_diffusers
from s2q_jax.conditions import load_conditions
from s2q_jax.data import procedural
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D, load_pretrained
from s2q_jax.tools import train_embedded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "train_config", os.path.join(ROOT, "configs", "train_embedded.py"))
train_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_config)
SMALL = dict(num_attention_heads=1, attention_head_dim=16, time_embed_dim=16, text_embed_dim=8,
             num_layers=1, sample_width=16, sample_height=16)


def _params(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_prefetched_batches_keep_the_stream_order():
  stream = procedural.batch_iterator(2, seed=3, height=16, width=16)
  direct = procedural.batch_iterator(2, seed=3, height=16, width=16)
  for (v, ids), (v_ref, ids_ref) in zip(itertools.islice(train_embedded._prefetched(stream), 6),
                                        itertools.islice(direct, 6)):
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(ids, ids_ref)


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_export_writes_the_ema_weights_and_leaves_the_model_alone(tmp_path, decay):
  cfg = CogVideoXConfig.from_dict(_small_model())
  model = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0))
  ema = train_embedded.EMA(model, decay)
  ema.params = jax.tree.map(lambda p: p * 0.5 + 1.0, ema.params)
  before = [np.asarray(p) for p in _params(model)]
  table = procedural.class_embeddings(procedural.NUM_CLASSES, 8, cfg.text_embed_dim)
  train_embedded._export(model, ema, ConfigDict(dict(ema_decay=decay, output=str(tmp_path))),
                         table)
  for p, p0 in zip(_params(model), before):
    np.testing.assert_array_equal(p, p0)
  written = _params(load_pretrained(str(tmp_path), "float32"))
  expected = jax.tree.leaves(ema.params) if decay > 0 else before
  assert len(written) == len(expected)
  for p, e in zip(written, expected):
    np.testing.assert_array_equal(p, e)
  loaded_table, names = load_conditions(str(tmp_path))
  np.testing.assert_array_equal(loaded_table, table)
  assert names[0] == procedural.class_name(0)


def _small_model():
  return dict(in_channels=3, out_channels=3, sample_frames=29, patch_size=4,
              max_text_seq_length=8, use_rotary_positional_embeddings=True, **SMALL)


def _train(tmp_path, capsys, **extra):
  cfg = train_config.get_config("base")
  cfg.model.update(SMALL)
  cfg.data.update(height=16, width=16)
  cfg.update({**dict(batch_size=2, num_steps=3, warmup_steps=1, log_every=1,
                     checkpoint_every=100, ema_decay=0.5, workdir=str(tmp_path / "work"),
                     output=str(tmp_path / "model")), **extra})
  train_embedded.train(cfg)
  return capsys.readouterr().out


def test_a_wall_time_stop_exports_and_the_same_command_resumes(tmp_path, capsys):
  out = _train(tmp_path, capsys, max_minutes=1e-9)
  assert "stopped at step 1/3" in out
  stopped = [np.asarray(p) for p in _params(load_pretrained(str(tmp_path / "model"), "float32"))]
  assert all(np.isfinite(p).all() for p in stopped)
  out = _train(tmp_path, capsys)
  assert "resumed from step 1" in out and "after 3 steps" in out
  assert "step 2/3" in out and "step 1/3" not in out
  done = _params(load_pretrained(str(tmp_path / "model"), "float32"))
  assert any(not np.array_equal(a, b) for a, b in zip(done, stopped))


def test_a_warmup_as_long_as_the_run_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit, match="warmup_steps=3 must be in"):
    _train(tmp_path, capsys, warmup_steps=3)


def test_a_mismatched_warm_start_is_refused(tmp_path):
  small = CogVideoXTransformer3D(CogVideoXConfig.from_dict(_small_model()), rngs=nnx.Rngs(0))
  save_diffusers(small, str(tmp_path / "src"))
  big = CogVideoXTransformer3D(CogVideoXConfig.from_dict({**_small_model(), "num_layers": 2}),
                               rngs=nnx.Rngs(0))
  with pytest.raises(SystemExit, match="another architecture"):
    train_embedded._warm_start(big, str(tmp_path / "src"))

