"""Layer selection on the real model's paths, module surgery and storage accounting."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax import deploy, quant
from s2q_jax.job_config import base_config
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D
from s2q_jax.models.layers import Linear
from pallas_kernels import packing

CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                      time_embed_dim=32, text_embed_dim=24, num_layers=2, sample_width=12,
                      sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=7)
TOP_LEVEL = {"patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1",
             "time_embedding.linear_2", "norm_out.linear", "proj_out"}


def _model():
  return CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))


def test_default_rules_quantize_every_block_linear_and_nothing_else():
  model = _model()
  infos = quant.quantize_model(model, quant.make_rules(4, 6))
  fp = {i.path for i in infos if not i.quantized}
  q = {i.path for i in infos if i.quantized}
  assert fp == TOP_LEVEL
  per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "ff.proj_in",
               "ff.proj_out", "norm1.linear", "norm2.linear"}
  assert q == {f"transformer_blocks.{b}.{n}" for b in range(2) for n in per_block}
  assert {p for p, _ in quant.quantized_layers(model)} == q
  assert all(isinstance(m, quant.QuantLinear) == (p in q) for p, m in quant.iter_linears(model))


def test_overrides_and_first_match_wins():
  rules = quant.make_rules(4, 6, overrides={
      r"transformer_blocks\.0\.": "w8a8", r"\.ff\.": "w3afp"})
  assert quant.match(rules, "transformer_blocks.0.ff.proj_in") == (8, 8)
  assert quant.match(rules, "transformer_blocks.1.ff.proj_in") == (3, None)
  assert quant.match(rules, "transformer_blocks.1.attn1.to_q") == (4, 6)
  assert quant.match(rules, "proj_out") is None


@pytest.mark.parametrize("spec", ["w9a6", "x4a6", "w4a1"])
def test_bad_bit_specs_are_refused(spec):
  with pytest.raises(ValueError):
    quant.make_rules(4, 6, overrides={"a": spec})


def test_bad_pattern_is_refused():
  with pytest.raises(ValueError, match="bad layer pattern"):
    quant.make_rules(4, 6, keep_fp=["(unclosed"])


def test_quantized_model_still_runs_and_differs_slightly():
  model = _model()
  x, text, t = jnp.ones((1, 2, 4, 8, 12)) * 0.3, jnp.ones((1, 7, 24)) * 0.1, jnp.array([500])
  ref = model(x, text, t)
  quant.quantize_model(model, quant.make_rules(8, 8))
  out = model(x, text, t)
  assert not np.array_equal(out, ref)
  assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 0.05


def test_storage_accounting_matches_hand_arithmetic():
  model = _model()
  n_params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  infos = quant.quantize_model(model, quant.make_rules(4, 6))
  size = deploy.storage_bytes(model)
  assert size["fp_bytes"] == 2 * n_params
  expected = 2 * n_params
  for i in infos:
    if i.quantized:
      k, n = i.shape
      expected -= 2 * (k * n + n)  # bf16 kernel and bias replaced by...
      expected += n * packing.packed_row_bytes(k, 4) + 2 * n + 2 * n  # codes, f16 scales, bf16 bias
  assert size["quant_bytes"] == expected
  assert size["compression"] == pytest.approx(size["fp_bytes"] / size["quant_bytes"])


def test_large_four_bit_model_approaches_but_stays_under_4x():
  big = CogVideoXConfig(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4,
                        time_embed_dim=64, text_embed_dim=32, num_layers=2, sample_width=8,
                        sample_height=8, sample_frames=1, patch_size=2, max_text_seq_length=4)
  model = CogVideoXTransformer3D(big, rngs=nnx.Rngs(0))
  quant.quantize_model(model, quant.make_rules(4, 6))
  ratio = deploy.storage_bytes(model)["compression"]
  assert 3.6 < ratio < 4.0


def test_job_config_rules_put_the_timestep_mlp_at_8_bit_weight_only():
  rules = quant.rules_from_config(base_config(4, 6, "s2q").quant,
                                  CogVideoXTransformer3D.quant_defaults())
  for path in ("patch_embed.proj", "patch_embed.text_proj", "proj_out"):
    assert quant.match(rules, path) is None, path
  for path in ("time_embedding.linear_1", "time_embedding.linear_2", "norm_out.linear"):
    assert quant.match(rules, path) == (8, None), path
  assert quant.match(rules, "transformer_blocks.3.norm1.linear") == (4, 6)


def test_default_keep_fp_spares_block_proj_out():
  rules = quant.make_rules(4, 6)  # keep_fp defaults to DEFAULT_KEEP_FP
  for path in TOP_LEVEL | {"ofs_embedding.linear_1"}:
    assert quant.match(rules, path) is None, path
  for path in ("transformer_blocks.0.ff.proj_out", "transformer_blocks.7.norm1.linear",
               "transformer_blocks.7.norm2.linear", "transformer_blocks.0.attn1.to_out"):
    assert quant.match(rules, path) == (4, 6), path
  assert quant.match(quant.make_rules(4, 6, keep_fp=()), "proj_out") == (4, 6)


def test_tuple_overrides_and_config_helper():
  import ml_collections  # pylint: disable=import-outside-toplevel
  rules = quant.make_rules(4, 6, overrides={r"transformer_blocks\.0\..*": (8, 8),
                                            r"\.ff\.": (3, None)})
  assert quant.match(rules, "transformer_blocks.0.ff.proj_in") == (8, 8)
  assert quant.match(rules, "transformer_blocks.1.ff.proj_in") == (3, None)
  cfg = ml_collections.ConfigDict({"w_bits": 3, "a_bits": 6})
  assert quant.rules_from_config(cfg) == quant.make_rules(3, 6)
  cfg.overrides = ml_collections.ConfigDict({r"attn1\.to_q$": "w8a8"}, allow_dotted_keys=True)
  assert quant.match(quant.rules_from_config(cfg), "transformer_blocks.2.attn1.to_q") == (8, 8)
  pairs = ((r"attn1\.to_q$", "w8a8"), (r"attn1\.", (3, 6)))  # dots without a ConfigDict
  rules = quant.rules_from_config(ml_collections.ConfigDict({"w_bits": 3, "a_bits": 6,
                                                              "overrides": pairs}))
  assert quant.match(rules, "transformer_blocks.2.attn1.to_q") == (8, 8)
  assert quant.match(rules, "transformer_blocks.2.attn1.to_k") == (3, 6)
  with pytest.raises(ValueError, match="from 2 to 8"):
    quant.rules_from_config(ml_collections.ConfigDict({"w_bits": 1, "a_bits": 6}))
  with pytest.raises(ValueError, match="must be 'w4a6'"):
    quant.make_rules(4, 6, overrides={"a": (4,)})
  with pytest.raises(ValueError, match="activation-only"):
    quant.QuantRule("a", None, 6)


class _Toy(nnx.Module):
  """Just the module layout of the real model: attribute children and an nnx.List of blocks."""

  def __init__(self, rngs):
    lin = lambda: Linear(4, 4, rngs=rngs)  # noqa: E731
    self.time_embedding = nnx.Dict(linear_1=lin())
    self.ofs_embedding = nnx.Dict(linear_1=lin())
    self.transformer_blocks = nnx.List([nnx.Dict(norm1=nnx.Dict(linear=lin()),
                                                 ff=nnx.Dict(proj_out=lin()))
                                        for _ in range(2)])
    self.proj_out = lin()


def test_surgery_on_lists_and_attributes_reports_every_linear():
  model = _Toy(nnx.Rngs(0))
  infos = quant.quantize_model(model, quant.make_rules(4, 6, overrides={
      r"^transformer_blocks\.1\.ff\.": "w8a8"}))
  report = {i.path: (i.w_bits, i.a_bits) for i in infos}
  assert report == {"time_embedding.linear_1": (None, None), "ofs_embedding.linear_1": (None, None),
                    "transformer_blocks.0.norm1.linear": (4, 6),
                    "transformer_blocks.0.ff.proj_out": (4, 6),
                    "transformer_blocks.1.norm1.linear": (4, 6),
                    "transformer_blocks.1.ff.proj_out": (8, 8), "proj_out": (None, None)}
  assert isinstance(model.transformer_blocks[1]["ff"]["proj_out"], quant.QuantLinear)
  assert model.transformer_blocks[1]["ff"]["proj_out"].w_bits == 8
  assert isinstance(model.proj_out, Linear)
  # Running it again finds nothing new to wrap; freeze_all fixes the codes of every layer.
  again = quant.quantize_model(model, quant.make_rules(4, 6))
  assert {i.path for i in again} == {"time_embedding.linear_1", "ofs_embedding.linear_1",
                                     "proj_out"}
  quant.freeze_all(model)
  assert all(m.codes is not None for _, m in quant.quantized_layers(model))
