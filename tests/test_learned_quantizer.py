"""The quantizer's learned parts against direct computations: the Kronecker input transform,
activation clipping (fake quant, kernels, deployment), and the projection of bounded parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import quantize_weight, reference, w4a6_matmul
from s2q_jax import deploy, quant
from s2q_jax.distillation.block_reconstruction import BlockData, TrainConfig, train_block
from s2q_jax.models import CogVideoXTransformer3D
from s2q_jax.models.layers import Linear
from s2q_jax.quant import kronecker, quantizer
from s2q_jax.quant.qlinear import ActClip, KroneckerFactor, WeightClip
from tiny import ONE_BLOCK


def _x(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _layer(k, n, w_bits=4, a_bits=6, seed=0):
  lin = Linear(k, n, rngs=nnx.Rngs(seed))
  lin.kernel[...] = _x((k, n), seed)
  return quant.QuantLinear(lin, w_bits=w_bits, a_bits=a_bits, path="layer")


def _learned(layer, seed=1):
  """Arbitrary (non-identity, invertible) transform factors and a clip below 1."""
  a, b = kronecker.factor_sizes(layer.in_features)
  rng = np.random.default_rng(seed)
  layer.transform_left = KroneckerFactor(jnp.eye(a) + 0.3 * _x((a, a), seed))
  layer.transform_right = KroneckerFactor(jnp.eye(b) + 0.3 * _x((b, b), seed + 1))
  layer.smooth = quant.SmoothScale(jnp.asarray(rng.uniform(0.5, 2.0, layer.in_features),
                                               jnp.float32))
  layer.act_clip = ActClip(jnp.asarray(0.7))
  return layer


@pytest.mark.parametrize("k, sizes", [(128, (8, 16)), (512, (16, 32)), (1920, (40, 48)),
                                      (3072, (48, 64)), (96, (8, 12)), (7, (1, 7))])
def test_factor_sizes_are_near_square_root(k, sizes):
  assert kronecker.factor_sizes(k) == sizes


def test_kronecker_apply_and_fold_match_numpy():
  p1, p2 = np.asarray(_x((4, 4), 0)) + 3 * np.eye(4), np.asarray(_x((6, 6), 1)) + 3 * np.eye(6)
  x, w = np.asarray(_x((2, 5, 24), 2)), np.asarray(_x((24, 7), 3))
  full = np.kron(p1.astype(np.float64), p2.astype(np.float64))
  np.testing.assert_allclose(kronecker.apply(jnp.asarray(x), jnp.asarray(p1), jnp.asarray(p2)),
                             x @ full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(kronecker.fold_inverse(jnp.asarray(w), jnp.asarray(p1),
                                                    jnp.asarray(p2)),
                             np.linalg.solve(full, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["identity", "hadamard"])
def test_initial_factors_are_orthogonal(init):
  p1, p2 = kronecker.initial_factors(96, init)
  for p in (p1, p2):
    np.testing.assert_allclose(np.asarray(p) @ np.asarray(p).T, np.eye(p.shape[0]), atol=1e-6)
  if init == "hadamard":
    assert not np.allclose(p2, np.eye(p2.shape[0]))


def test_transform_changes_only_what_is_quantized():
  """x W = ((x / s) P)(P⁻¹ diag(s) W): with 8-bit weights and float activations, nearly exact."""
  layer = _learned(_layer(24, 10, w_bits=8, a_bits=None))
  x = _x((6, 24), 4)
  w = layer.kernel[...]
  np.testing.assert_allclose(layer.transform_input(x) @ layer.effective_kernel(), x @ w,
                             rtol=1e-4, atol=1e-4)
  assert float(jnp.linalg.norm(layer(x) - x @ w) / jnp.linalg.norm(x @ w)) < 0.02


def test_activation_clip_saturates_at_the_clipped_absmax():
  x = np.asarray(_x((8, 32), 5))
  clip = 0.6
  out = np.asarray(quantizer.fake_quant_activations(jnp.asarray(x), 6, jnp.asarray(clip)))
  scale = np.abs(x).max(1, keepdims=True) * clip / 31
  expected = np.clip(np.round(x / scale), -32, 31) * scale
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  assert np.abs(out).max() < np.abs(x).max()  # the largest values saturated


def test_activation_clip_gradient_is_lsq():
  """d/dc Σ_i g_i q_i(c) with q = clip(round(x/s), lo, hi)·s, s = c·absmax/31 (STE rounding)."""
  x = np.asarray(_x((4, 16), 6)) * 3
  g = np.asarray(_x((4, 16), 7))
  c = 0.55
  grad = jax.grad(lambda c_: jnp.sum(jnp.asarray(g) * quantizer.fake_quant_activations(
      jnp.asarray(x), 6, c_)))(jnp.asarray(c))
  absmax = np.abs(x).max(1, keepdims=True)
  s = absmax * c / 31
  r = x / s
  inside = (r >= -32.5) & (r < 31.5)
  assert not np.all(inside)  # some values saturate
  ds_dc = absmax / 31
  dq_ds = np.where(inside, np.round(r) - r, np.clip(np.round(r), -32, 31))
  np.testing.assert_allclose(grad, np.sum(g * dq_ds * ds_dc), rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "interpret", "tpu_interpret"])
def test_kernels_apply_the_activation_clip(backend):
  x = _x((37, 64), 8)
  qw = quantize_weight(np.asarray(_x((64, 48), 9)) * 0.05, 4)
  clip = jnp.asarray(0.45)
  codes, scales = reference.quantize_activations(x, 6, clip)
  expected = reference.matmul(codes, scales, qw, None, jnp.float32)
  out = w4a6_matmul(x, qw, act_bits=6, act_clip=clip, backend=backend, block_m=32, block_n=32,
                    block_k=64)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # ...and the clip matters: without it the codes, hence the output, differ.
  assert not np.allclose(out, w4a6_matmul(x, qw, act_bits=6, backend="reference"), atol=1e-3)


def test_deployed_layer_equals_frozen_fake_quant_with_every_learned_part(tmp_path):
  model = CogVideoXTransformer3D(ONE_BLOCK, rngs=nnx.Rngs(0))
  quant.quantize_model(model, quant.make_rules(4, 6))
  for i, (_, layer) in enumerate(quant.quantized_layers(model)):
    _learned(layer, seed=10 + i)
  quant.freeze_all(model)
  deploy.round_fp_params(model)
  deploy.export_quantized(model, str(tmp_path))
  from s2q_jax.pretrained import load_pretrained  # pylint: disable=import-outside-toplevel
  deployed = load_pretrained(str(tmp_path), backend="reference")
  x, c, t = _x((1, 2, 3, 8, 8), 11), _x((1, 4, 16), 12), jnp.array([300])
  np.testing.assert_allclose(deployed(x, c, t), model(x, c, t), rtol=1e-4, atol=1e-5)
  layer = deployed.transformer_blocks[0].attn1.to_q
  assert layer.transform_left is not None and float(layer.act_clip[...][0]) == pytest.approx(0.7)


def test_bounded_parameters_are_projected_after_every_step():
  """A huge learning rate pushes clipping factors out of range; they must come back."""
  model = CogVideoXTransformer3D(ONE_BLOCK, rngs=nnx.Rngs(0))
  quant.quantize_model(model, quant.make_rules(3, 4))
  block = model.transformer_blocks[0]
  for _, layer in quant.quantized_layers(block):
    layer.act_clip = ActClip(jnp.asarray(0.9))
  rng = np.random.default_rng(0)
  n, nv, nt, d = 4, 8, 4, 32
  video, text, temb, target_v, target_t = (rng.standard_normal(s).astype(np.float32) * 3 for s in
      [(n, nv, d), (n, nt, d), (n, 32), (n, nv, d), (n, nt, d)])
  data = BlockData((text, video), (temb,), (target_t, target_v), np.ones((n, nt + nv), np.float32))
  mesh = jax.make_mesh((1,), ("data",))
  train_block(block, data, None, TrainConfig(epochs=3, batch_size=4), mesh,
              groups={WeightClip: 5.0, ActClip: 5.0})
  clips = np.concatenate([np.asarray(l.clip[...]) for _, l in quant.quantized_layers(block)])
  acts = np.array([float(l.act_clip[...]) for _, l in quant.quantized_layers(block)])
  assert clips.min() >= WeightClip.bounds[0] and clips.max() <= WeightClip.bounds[1]
  assert acts.min() >= ActClip.bounds[0] and acts.max() <= ActClip.bounds[1]
  # The steps were large enough to leave the range: some values sit on a bound.
  assert np.any(np.isin(clips, WeightClip.bounds)) and np.any(np.isin(acts, ActClip.bounds))
