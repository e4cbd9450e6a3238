"""T5 text encoder and tokenizer against transformers' PyTorch implementation.

Every configuration is a tiny random T5 with all parameters perturbed (norm
weights included), saved with `save_pretrained` and loaded back through
`load_text_encoder`; tokenizers are trained here from a few sentences.
"""
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion.checkpoint_files import CheckpointError
from s2q_jax.models import (T5EncoderConfig, UnsupportedConfigError, encode_prompts,
                            load_text_encoder, load_tokenizer)
from s2q_jax.models import t5_tokenizer
from s2q_jax.models.params import flat_params
from s2q_jax.models.t5 import relative_position_buckets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

# Varied so each dimension has its own size and the bias table hits its clamp
# (sequences longer than max_distance). `shard` saves through the sharded index.
CONFIGS = {
    "v1.1-gated-gelu": dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                            relative_attention_num_buckets=8, relative_attention_max_distance=20,
                            feed_forward_proj="gated-gelu"),
    "wide-heads-sharded": dict(d_model=24, d_kv=16, num_heads=3, d_ff=40, num_layers=3,
                               relative_attention_num_buckets=32,
                               relative_attention_max_distance=128,
                               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-3,
                               shard="4KB"),
    "v1.0-relu": dict(d_model=16, d_kv=4, num_heads=2, d_ff=64, num_layers=1,
                      relative_attention_num_buckets=16, relative_attention_max_distance=12,
                      feed_forward_proj="relu"),
    "gelu-one-head": dict(d_model=20, d_kv=12, num_heads=1, d_ff=28, num_layers=2,
                          relative_attention_num_buckets=6, relative_attention_max_distance=9,
                          feed_forward_proj="gelu"),
}
VOCAB = 180  # covers the tiny tokenizer's 70 pieces + 100 sentinels
LENGTH = 40
SENTENCES = ["A red square moves to the right across a dark background.",
             "A small dog runs along the beach at sunset, waves rolling in.",
             "Time-lapse of clouds drifting over snowy mountains; café lights flicker.",
             "Two cats play with a ball of yarn on a wooden floor.",
             "An astronaut rides a horse on the moon, cinematic, 4k."]
PROMPTS = ["A red dog moves", "", "   ", "  Two   cats\tplay\n on the moon, ÀÉ ｆｕｌｌ ﬁ ½",
           "x <extra_id_0> y </s> z <pad> <unk>", "dog</s>cat",
           "A small dog runs along the beach at sunset, waves rolling in, time-lapse of clouds"]


# One compiled program per configuration: much faster here than op-by-op eager calls.
_run = nnx.jit(lambda encoder, ids, mask=None: encoder(ids, mask))


def _torch_encoder(seed=0, vocab_size=VOCAB, **cfg):
  torch.manual_seed(seed)
  config = transformers.T5Config(vocab_size=vocab_size, is_encoder_decoder=False, **cfg)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      else:
        p.add_(0.2 * torch.randn_like(p))
  return model


def _save(model, folder, shard=None):
  model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
  return str(folder)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _rms_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(model, ids, mask=None):
  with torch.no_grad():
    return model(torch.from_numpy(ids).long(),
                 attention_mask=None if mask is None else torch.from_numpy(mask)
                 ).last_hidden_state.float().numpy()


def test_relative_position_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  position = torch.arange(300)
  relative = position[None, :] - position[:, None]
  for num_buckets, max_distance in [(32, 128), (8, 20), (16, 12), (6, 9), (64, 300)]:
    ref = bucket(relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(relative_position_buckets(300, num_buckets, max_distance),
                                  ref.numpy())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_matches_transformers(name, tmp_path):
  cfg = dict(CONFIGS[name])
  shard = cfg.pop("shard", None)
  model = _torch_encoder(**cfg)
  folder = _save(model, tmp_path / "text_encoder", shard)
  assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json")) == bool(shard)
  encoder = load_text_encoder(folder)
  assert encoder.config == T5EncoderConfig(vocab_size=VOCAB, **cfg)
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)
  out = _run(encoder, jnp.asarray(ids))
  assert out.shape == (2, LENGTH, cfg["d_model"]) and out.dtype == jnp.float32
  err = _rel_err(out, _reference(model, ids))
  print(f"T5 parity {name}: relative max error {err:.2e}")
  assert err <= 1e-4, err


def test_attention_mask_matches_transformers(tmp_path):
  model = _torch_encoder(**CONFIGS["v1.1-gated-gelu"])
  encoder = load_text_encoder(_save(model, tmp_path / "te"))
  ids = np.random.default_rng(1).integers(0, VOCAB, (3, 24)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 10:], mask[1, 1:] = 0, 0
  err = _rel_err(_run(encoder, jnp.asarray(ids), jnp.asarray(mask)), _reference(model, ids, mask))
  print(f"T5 parity with attention mask: relative max error {err:.2e}")
  assert err <= 1e-4
  # The mask changes the result, so it is not ignored.
  assert _rel_err(_run(encoder, jnp.asarray(ids)), _reference(model, ids, mask)) > 1e-2


def test_bfloat16(tmp_path):
  model = _torch_encoder(**CONFIGS["v1.1-gated-gelu"])
  folder = _save(model, tmp_path / "f32")
  ids = np.random.default_rng(2).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)
  cast = load_text_encoder(folder, dtype="bfloat16")
  assert all(v.dtype == jnp.bfloat16 for v in flat_params(cast).values())
  bf16_model = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
  ref32, ref16 = _reference(model, ids), _reference(bf16_model, ids)
  ours = np.asarray(_run(cast, jnp.asarray(ids)), np.float32)
  # bfloat16 rounding dominates (transformers' own bfloat16 run is ~3% off its
  # float32 one here), so compare relative RMS errors: ours must be as close to
  # float32 as transformers' bfloat16, and closer still to transformers' bfloat16.
  torch_err, our_err, between = _rms_err(ref16, ref32), _rms_err(ours, ref32), _rms_err(ours, ref16)
  print(f"T5 bfloat16 relative RMS error vs float32: transformers {torch_err:.2e}, ours "
        f"{our_err:.2e}; ours vs transformers bfloat16 {between:.2e}")
  assert our_err <= 1.25 * torch_err and between <= 0.75 * torch_err
  stored_bf16 = _save(bf16_model, tmp_path / "bf16")
  kept = load_text_encoder(stored_bf16)  # dtype None keeps the checkpoint's
  assert all(v.dtype == jnp.bfloat16 for v in flat_params(kept).values())
  np.testing.assert_array_equal(np.asarray(_run(kept, jnp.asarray(ids)), np.float32), ours)


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  """(spiece.model-only folder, tokenizer.json folder) of one tiny trained Unigram model."""
  spm_dir = tmp_path_factory.mktemp("spiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=70,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  (spm_dir / "spiece.model").write_bytes(model.getvalue())
  reference = transformers.T5Tokenizer.from_pretrained(spm_dir)
  # A call before saving leaves padding/truncation state in tokenizer.json,
  # as real saved tokenizers often have; loading must not inherit it.
  reference(PROMPTS, padding="max_length", max_length=5, truncation=True)
  json_dir = tmp_path_factory.mktemp("tokenizer_json")
  reference.save_pretrained(json_dir)
  assert os.path.isfile(json_dir / "tokenizer.json")
  return spm_dir, json_dir


def _pipeline_ids(folder, prompts, max_length):
  """What diffusers' CogVideoXPipeline._get_t5_prompt_embeds feeds the text encoder."""
  tok = transformers.T5Tokenizer.from_pretrained(folder)
  return np.asarray(tok(prompts, padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True).input_ids)


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
@pytest.mark.parametrize("max_length", [1, 12, 40])
def test_tokenizer_matches_transformers(tokenizer_dirs, kind, max_length):
  folder = tokenizer_dirs[kind == "tokenizer.json"]
  tokenizer = load_tokenizer(folder)
  assert isinstance(tokenizer, t5_tokenizer.FastT5Tokenizer if kind == "tokenizer.json"
                    else t5_tokenizer.SentencePieceT5Tokenizer)
  ids = tokenizer(PROMPTS, max_length)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
  np.testing.assert_array_equal(ids, _pipeline_ids(folder, PROMPTS, max_length))
  if max_length == 12:  # the long prompt is cut to 11 pieces + EOS
    assert ids[-1, -1] == 1 and (ids[-1] != 0).all()


def test_encode_prompts_matches_pipeline(tokenizer_dirs, tmp_path):
  """A whole pipeline folder: prompts → embeddings as diffusers computes them (no mask)."""
  root = tmp_path / "pipeline"
  model = _torch_encoder(**CONFIGS["wide-heads-sharded"])
  _save(model, root / "text_encoder")
  os.symlink(tokenizer_dirs[0], root / "tokenizer")
  (root / "model_index.json").write_text("{}")
  tokenizer, encoder = load_tokenizer(root), load_text_encoder(root)
  prompts = PROMPTS[:5]  # batch_size 2: two full batches and a padded last one
  out = encode_prompts(tokenizer, encoder, prompts, max_length=16, batch_size=2)
  assert out.shape == (5, 16, 24)
  ref = _reference(model, _pipeline_ids(tokenizer_dirs[0], prompts, 16).astype(np.int32))
  err = _rel_err(out, ref)
  print(f"encode_prompts vs tokenizer + T5EncoderModel: relative max error {err:.2e}")
  assert err <= 1e-4


# --- bad inputs --------------------------------------------------------------------------------

@pytest.fixture
def saved_encoder(tmp_path):
  return _save(_torch_encoder(**CONFIGS["v1.1-gated-gelu"]), tmp_path / "te")


def _edit(folder, edit):
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def _edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def test_key_problems_are_listed_together(saved_encoder):
  def edit(t):
    del t["encoder.block.1.layer.1.layer_norm.weight"]
    t["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros(3, np.float32)
    t["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((48, 32), np.float32)
    t["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros(2, np.float32)  # skipped

  _edit(saved_encoder, edit)
  with pytest.raises(CheckpointError) as e:
    load_text_encoder(saved_encoder)
  msg = str(e.value)
  for fragment in ["missing keys: encoder.block.1.layer.1.layer_norm.weight",
                   "unexpected keys: encoder.block.0.layer.0.SelfAttention.extra.weight",
                   "mis-shaped keys: encoder.block.0.layer.1.DenseReluDense.wo.weight (48, 32) "
                   "(expected (32, 48))"]:
    assert fragment in msg
  assert "decoder" not in msg


def test_embedding_under_its_tied_name_loads(saved_encoder):
  before = flat_params(load_text_encoder(saved_encoder))["embedding"]
  _edit(saved_encoder, lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")}))
  after = flat_params(load_text_encoder(saved_encoder))["embedding"]
  np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


@pytest.mark.parametrize("change, message", [
    (dict(is_decoder=True), "is_decoder=true describes a T5 decoder"),
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj='gated-silu' is not supported"),
    (dict(model_type="umt5"), "model_type 'umt5' is not supported"),
    (dict(relative_attention_max_distance=2), "must exceed relative_attention_num_buckets // 4"),
])
def test_unsupported_config_is_refused(saved_encoder, change, message):
  _edit_config(saved_encoder, **change)
  with pytest.raises(UnsupportedConfigError, match=message):
    load_text_encoder(saved_encoder)


def test_missing_files_and_folders(saved_encoder, tmp_path):
  with pytest.raises(CheckpointError, match="is not a directory"):
    load_text_encoder(tmp_path / "nowhere")
  with pytest.raises(CheckpointError, match="has no config.json"):
    load_text_encoder(tmp_path)
  os.remove(os.path.join(saved_encoder, "model.safetensors"))
  with pytest.raises(CheckpointError,
                     match="has no model.safetensors or model.safetensors.index.json"):
    load_text_encoder(saved_encoder)
  (tmp_path / "model_index.json").write_text("{}")
  with pytest.raises(CheckpointError, match="has no text_encoder/ sub-folder"):
    load_text_encoder(tmp_path)
  with pytest.raises(CheckpointError, match="neither tokenizer.json nor spiece.model"):
    load_tokenizer(saved_encoder)


def test_dtype_errors(saved_encoder):
  with pytest.raises(ValueError, match="unsupported dtype .* use None"):
    load_text_encoder(saved_encoder, dtype="int8")
  _edit(saved_encoder, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
  with pytest.raises(CheckpointError, match="float16 weights, which overflow in T5: pass "
                                            "dtype='bfloat16'"):
    load_text_encoder(saved_encoder)
  assert flat_params(load_text_encoder(saved_encoder, "float32"))["embedding"].dtype == jnp.float32


def test_bad_call_arguments(saved_encoder, tokenizer_dirs):
  encoder = load_text_encoder(saved_encoder)
  with pytest.raises(ValueError, match="input_ids must be integer token ids"):
    encoder(jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="attention_mask must have the shape"):
    encoder(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5)))
  tokenizer = load_tokenizer(tokenizer_dirs[0])
  with pytest.raises(TypeError, match=r"items \[1\] are not"):
    tokenizer(["ok", None])
  with pytest.raises(ValueError, match="max_length must be a positive integer"):
    tokenizer(["ok"], 0)
  with pytest.raises(ValueError, match="no prompts"):
    encode_prompts(tokenizer, encoder, [])
  small = _save(_torch_encoder(vocab_size=50, **CONFIGS["v1.0-relu"]), saved_encoder + "_small")
  with pytest.raises(ValueError, match="past the text encoder's vocab_size 50"):
    encode_prompts(tokenizer, load_text_encoder(small), ["x <extra_id_0>"])


def test_missing_tokenizer_package_says_how_to_install(tokenizer_dirs, monkeypatch):
  def unavailable(name):
    raise ImportError(name)
  monkeypatch.setattr(t5_tokenizer.importlib, "import_module", unavailable)
  with pytest.raises(ImportError, match="needs the 'tokenizers' package: pip install tokenizers"):
    load_tokenizer(tokenizer_dirs[1])
  with pytest.raises(ImportError, match="needs the 'sentencepiece' package"):
    load_tokenizer(tokenizer_dirs[0])
