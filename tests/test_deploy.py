"""Quantized checkpoints: export, reload with the kernels, and agreement with fake-quant."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax import deploy, quant
from s2q_jax.job_config import base_config
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D
from s2q_jax.pretrained import load_pretrained

CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=32, in_channels=3, out_channels=3,
                      time_embed_dim=32, text_embed_dim=24, num_layers=2, sample_width=16,
                      sample_height=16, sample_frames=5, patch_size=4, max_text_seq_length=6,
                      use_rotary_positional_embeddings=True)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((2, 2, 3, 16, 16)), jnp.float32),
          jnp.asarray(rng.standard_normal((2, 6, 24)), jnp.float32), jnp.array([50, 900]))


@pytest.fixture
def exported(tmp_path):
  fp = CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))
  model = CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))
  # The job's defaults (8-bit weight-only timestep MLP) plus a 3-bit override.
  qcfg = base_config(4, 6, "rtn").quant
  keep_fp, overrides = model.quant_defaults()
  qcfg.overrides = ((r"ff\.proj_in", "w3a8"),) + tuple(overrides)
  quant.quantize_model(model, quant.rules_from_config(qcfg, (keep_fp, ())))
  quant.freeze_all(model)
  deploy.round_fp_params(model)
  deploy.export_quantized(model, str(tmp_path))
  return fp, model, tmp_path


@pytest.mark.parametrize("backend", ["reference", "interpret", "tpu_interpret"])
def test_reloaded_checkpoint_reproduces_fake_quant(exported, backend):
  fp, model, path = exported
  deployed = load_pretrained(str(path), backend=backend)
  assert isinstance(deployed.transformer_blocks[0].attn1.to_q, deploy.DeployedLinear)
  assert deployed.transformer_blocks[1].ff.proj_in.bits == 3
  x, text, t = _inputs()
  forward = nnx.jit(lambda m, *args: m(*args))  # one program per model, as generation runs it
  ref, fq, out = forward(fp, x, text, t), forward(model, x, text, t), forward(deployed, x, text, t)
  # Same integer codes and scales; float epilogues may differ by an ulp, which can flip a
  # rounding decision downstream. The gap must be far below the quantization error itself.
  assert float(jnp.linalg.norm(out - fq)) < 0.05 * float(jnp.linalg.norm(fq - ref))


def test_each_deployed_layer_matches_its_fake_quant_layer(exported):
  _, model, path = exported
  deployed = load_pretrained(str(path), backend="interpret")
  x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 64)), jnp.float32)
  for name, layer in quant.quantized_layers(model):
    node = deployed
    for key in name.split("."):
      node = node[int(key)] if key.isdigit() else getattr(node, key)
    xin = x[:, :layer.in_features] if layer.in_features <= 64 else jnp.tile(x, (1, 4))[:, :layer.in_features]
    np.testing.assert_allclose(node(xin), layer(xin), rtol=1e-5, atol=1e-5, err_msg=name)


def test_checkpoint_is_packed_and_small(exported):
  fp, model, path = exported
  from safetensors import safe_open
  weights = path / deploy.WEIGHTS_NAME
  with safe_open(str(weights), framework="numpy") as f:
    stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    n_tensors = len(f.keys())
  # The file is the packed arrays (as counted by storage_bytes) plus the safetensors header.
  assert stored == deploy.storage_bytes(model)["quant_bytes"]
  assert weights.stat().st_size - stored < 200 * n_tensors
  fp_bf16 = 2 * sum(v.size for _, v in nnx.to_flat_state(nnx.state(fp, nnx.Param)))
  assert weights.stat().st_size < fp_bf16 / 2
  with safe_open(str(weights), framework="numpy") as f:
    codes = f.get_tensor("transformer_blocks.0.attn1.to_q.codes")
    assert codes.dtype == np.uint8 and codes.shape == (64, 32)  # (N, K·4/8)
    assert f.get_tensor("proj_out.kernel").dtype.name == "bfloat16"


def test_export_reports_unquantized_model_clearly(tmp_path):
  model = CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))
  deploy.export_quantized(model, str(tmp_path))  # nothing quantized: every layer in bf16
  reloaded = load_pretrained(str(tmp_path))
  x, text, t = _inputs()
  np.testing.assert_allclose(reloaded(x, text, t), model(x, text, t), rtol=0.05, atol=0.05)


def test_models_loader_refuses_quantized_checkpoint(tmp_path):
  """`s2q_jax.models` does not build deployed layers (deploy depends on it): its loader
  names the one that does, instead of returning a model without the quantized layers."""
  from conversion.checkpoint_files import CheckpointError  # pylint: disable=import-outside-toplevel
  from s2q_jax import models  # pylint: disable=import-outside-toplevel
  deploy.export_quantized(CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0)), str(tmp_path))
  with pytest.raises(CheckpointError, match="is a quantized checkpoint .*s2q_jax.pretrained"):
    models.load_pretrained(str(tmp_path))


def _at(model, dotted):
  node = model
  for key in dotted.split("."):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


@pytest.mark.parametrize("backend", ["auto", "xla_int8", "interpret"])
def test_bf16_model_layers_take_and_return_bf16(exported, backend):
  """Deployed in bf16: bf16 in, bf16 out, and the same numbers as the float32 fake-quant
  layer rounded once to bf16 (same integer codes, float32 epilogue)."""
  _, model, path = exported
  deployed = load_pretrained(str(path), dtype=jnp.bfloat16, backend=backend)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((7, 256)), jnp.bfloat16)
  for name, layer in quant.quantized_layers(model):
    node = _at(deployed, name)
    # Pallas kernels keep 4-bit codes packed as on disk; auto / xla_int8 hold them as int8.
    assert node.weight.packed == (backend == "interpret" and node.bits == 4), name
    xin = x[:, :layer.in_features]
    out = node(xin)
    assert out.dtype == jnp.bfloat16, name
    expected = layer(xin.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                               rtol=2 ** -7, atol=1e-6, err_msg=name)


def test_bf16_activations_reach_the_kernel_without_a_float32_copy(exported):
  _, _, path = exported
  layer = load_pretrained(str(path), dtype=jnp.bfloat16).transformer_blocks[0].attn1.to_q
  x = jnp.zeros((2, 9, 64), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(layer)(x).jaxpr
  calls = [e for e in jaxpr.eqns if e.params.get("name") == "_matmul_2d"]
  assert len(calls) == 1
  assert calls[0].invars[0].aval.dtype == jnp.bfloat16
  assert calls[0].outvars[0].aval.dtype == jnp.bfloat16
  # Outside the kernel program, nothing activation-sized is float32.
  for e in jaxpr.eqns:
    for v in e.outvars:
      assert not (v.aval.dtype == jnp.float32 and v.aval.size >= 18 * 64), e


def test_storage_only_benchmark_measures_the_files(tmp_path):
  from s2q_jax import benchmark
  out = tmp_path / "storage.json"
  result = benchmark.main(["--preset", "small", "--storage-only", "--json", str(out)])
  assert json.loads(out.read_text()) == result and "forward_seconds" not in result
  s, params = result["storage"], result["params"]
  # bf16 file: two bytes per parameter plus a safetensors header of well under 100 kB.
  assert 2 * params < s["fp_bytes"] < 2 * params + 100_000
  # W4A6 linears hold most parameters: ≈ 4.25 bits each with scales, the rest in bf16.
  assert s["compression"] == pytest.approx(s["fp_bytes"] / s["quant_bytes"])
  assert 2 < s["compression"] < 4
  assert result["versions"]["jax"] == jax.__version__ and "--storage-only" in result["command"]
