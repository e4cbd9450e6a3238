"""diffusers ⇄ Flax conversion: exact round trips, sharded input, and every bad input."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conversion import diffusers_to_flax, flax_to_diffusers
from conversion.checkpoint_files import CheckpointError
from s2q_jax.models.loading import load_pretrained
from s2q_jax.models.params import flat_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _assert_same_state(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert torch.equal(a[k], b[k]), k


def test_round_trip_flax_diffusers_flax_is_exact(tiny_diffusers_dir, tmp_path):
  src, tm = tiny_diffusers_dir
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "flax"),
                                 "--dtype", "float32"]) == 0
  flax_model = load_pretrained(str(tmp_path / "flax"))
  assert flax_to_diffusers.main(["--src", str(tmp_path / "flax"), "--dst",
                                 str(tmp_path / "hf2")]) == 0
  back = diffusers.CogVideoXTransformer3DModel.from_pretrained(tmp_path / "hf2")
  _assert_same_state(tm.state_dict(), back.state_dict())
  again = load_pretrained(str(tmp_path / "hf2"))
  a, b = flat_params(flax_model), flat_params(again)
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bfloat16_conversion_keeps_dtype(tiny_diffusers_dir, tmp_path):
  src, tm = tiny_diffusers_dir
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "bf16")]) == 0
  model = load_pretrained(str(tmp_path / "bf16"))
  assert all(v.dtype == jnp.bfloat16 for v in flat_params(model).values())
  ref = tm.state_dict()["proj_out.weight"].to(torch.bfloat16).float().numpy().T
  np.testing.assert_array_equal(np.asarray(model.proj_out.kernel[...], np.float32), ref)


def test_sharded_checkpoint_loads(tiny_diffusers_dir, tmp_path):
  src, tm = tiny_diffusers_dir
  sharded = tmp_path / "sharded"
  tm.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.exists(sharded / f"{WEIGHTS}.index.json")
  a = flat_params(load_pretrained(str(src)))
  b = flat_params(load_pretrained(str(sharded)))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def _edit_weights(folder, edit):
  tensors = load_file(folder / WEIGHTS)
  edit(tensors)
  save_file(tensors, folder / WEIGHTS)


def test_key_problems_are_listed_together(tiny_diffusers_dir, tmp_path):
  src, _ = tiny_diffusers_dir

  def edit(t):
    del t["proj_out.bias"]
    del t["transformer_blocks.1.attn1.norm_k.weight"]
    t["extra.weight"] = np.zeros(3, np.float32)
    t["patch_embed.text_proj.weight"] = np.zeros((32, 5), np.float32)

  _edit_weights(src, edit)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(str(src))
  msg = str(e.value)
  for fragment in ["missing keys", "proj_out.bias", "transformer_blocks.1.attn1.norm_k.weight",
                   "unexpected keys", "extra.weight", "mis-shaped", "patch_embed.text_proj.weight"]:
    assert fragment in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_reported(tiny_diffusers_dir, tmp_path, damage):
  src, _ = tiny_diffusers_dir
  data = (src / WEIGHTS).read_bytes()
  (src / WEIGHTS).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
  dst = tmp_path / "out"
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(dst)]) == 1
  with pytest.raises(CheckpointError, match="corrupt or truncated"):
    load_pretrained(str(src))
  assert not dst.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_folder_without_config(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert diffusers_to_flax.main(["--src", str(tmp_path / "empty"), "--dst",
                                 str(tmp_path / "o")]) == 1
  assert "no config.json" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_pickle_checkpoint_refused_then_allowed(tiny_diffusers_dir, tmp_path, capsys):
  src, tm = tiny_diffusers_dir
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(src / "config.json", pickled / "config.json")
  torch.save(tm.state_dict(), pickled / "diffusion_pytorch_model.bin")
  assert diffusers_to_flax.main(["--src", str(pickled), "--dst", str(tmp_path / "o")]) == 1
  assert "--allow-pickle" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
  assert diffusers_to_flax.main(["--src", str(pickled), "--dst", str(tmp_path / "o"),
                                 "--allow-pickle", "--dtype", "float32"]) == 0
  a, b = flat_params(load_pretrained(str(src))), flat_params(load_pretrained(str(tmp_path / "o")))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_malicious_pickle_is_not_executed(tiny_diffusers_dir, tmp_path):
  src, _ = tiny_diffusers_dir
  bad = tmp_path / "bad"
  bad.mkdir()
  shutil.copy(src / "config.json", bad / "config.json")
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  torch.save({"x": Exploit()}, bad / "diffusion_pytorch_model.bin")
  with pytest.raises(CheckpointError, match="weights_only"):
    load_pretrained(str(bad), allow_pickle=True)
  assert not marker.exists()


def test_existing_destination_is_kept(tiny_diffusers_dir, tmp_path, capsys):
  src, _ = tiny_diffusers_dir
  dst = tmp_path / "exists"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(dst)]) == 1
  assert "already exists" in capsys.readouterr().err
  assert (dst / "keep.txt").read_text() == "mine"


def test_unsupported_config_gives_clear_error(tiny_diffusers_dir, tmp_path, capsys):
  src, _ = tiny_diffusers_dir
  cfg = json.loads((src / "config.json").read_text())
  cfg["patch_size_t"] = 2
  (src / "config.json").write_text(json.dumps(cfg))
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "o")]) == 1
  assert "patch_size_t" in capsys.readouterr().err
