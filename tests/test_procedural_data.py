"""The embedded model's procedural training videos and the GIF helpers."""
import numpy as np
import pytest
from PIL import Image

from s2q_jax.data import gif, procedural


def _centroids(video):
  """Per-frame centre of the pixels that differ from the background."""
  bg = np.median(video, axis=(2, 3), keepdims=True)
  mask = np.abs(video - bg).sum(1) > 0.8
  return np.array([np.argwhere(m).mean(0) for m in mask]), mask.sum((1, 2))


def test_deterministic_by_seed_and_in_range():
  ids = np.arange(procedural.NUM_CLASSES)
  a = procedural.sample_videos(ids, np.random.default_rng(5))
  b = procedural.sample_videos(ids, np.random.default_rng(5))
  c = procedural.sample_videos(ids, np.random.default_rng(6))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == (8, 8, 3, 32, 32) and a.dtype == np.float32
  assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("cid", range(procedural.NUM_CLASSES))
def test_each_class_shows_a_visible_moving_or_changing_object(cid):
  video = procedural.sample_videos(np.array([cid]), np.random.default_rng(cid))[0]
  centres, area = _centroids(video)
  assert area.min() >= 8, "object visible in every frame"
  moved = np.linalg.norm(centres[-1] - centres[0])
  changed = np.abs(np.diff(video, axis=0)).mean()
  assert moved > 3 or area.max() > 2 * area.min() or changed > 0.01


def test_motions_go_where_the_class_says():
  rng = np.random.default_rng(0)
  names = [procedural.class_name(i) for i in range(procedural.NUM_CLASSES)]
  right = _centroids(procedural.sample_videos([names.index("red square moving right")], rng)[0])[0]
  down = _centroids(procedural.sample_videos([names.index("green disc moving down")], rng)[0])[0]
  assert right[-1, 1] - right[0, 1] > 5 and abs(right[-1, 0] - right[0, 0]) < 1
  assert down[-1, 0] - down[0, 0] > 5 and abs(down[-1, 1] - down[0, 1]) < 1


def test_classes_differ_in_colour():
  videos = procedural.sample_videos(np.arange(procedural.NUM_CLASSES), np.random.default_rng(1))
  brightest = [v[0].reshape(3, -1)[:, np.argmax(np.abs(v[0]).sum(0))] for v in videos]
  dists = [np.linalg.norm(a - b) for i, a in enumerate(brightest) for b in brightest[i + 1:]]
  assert min(dists) > 0.05


def test_class_mean_videos_differ():
  rng = np.random.default_rng(2)
  means = np.stack([procedural.sample_videos(np.full(16, c), rng).mean(0)
                    for c in range(procedural.NUM_CLASSES)])
  gaps = [np.abs(a - b).mean() for i, a in enumerate(means) for b in means[i + 1:]]
  assert min(gaps) > 0.02


@pytest.mark.parametrize("frames,height,width", [(16, 32, 32), (24, 32, 32), (8, 32, 64),
                                                 (8, 64, 32), (8, 16, 16), (1, 32, 32)])
def test_other_sizes_keep_the_object_inside_the_frame(frames, height, width):
  for cid in range(procedural.NUM_CLASSES):
    videos = procedural.sample_videos(np.full(6, cid), np.random.default_rng(cid),
                                      num_frames=frames, height=height, width=width)
    assert videos.shape == (6, frames, 3, height, width)
    for v in videos:
      mask = np.abs(v - np.median(v, axis=(2, 3), keepdims=True)).sum(1) > 0.8
      assert mask.sum((1, 2)).min() >= 2, "object visible in every frame"
      border = mask[:, [0, -1], :].sum() + mask[:, :, [0, -1]].sum()
      assert border <= 0.05 * mask.sum(), "object stays (almost) inside the frame"


def test_batch_iterator_is_deterministic_and_covers_the_classes():
  a, b = procedural.batch_iterator(64, seed=3), procedural.batch_iterator(64, seed=3)
  for _ in range(2):
    (va, ia), (vb, ib) = next(a), next(b)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(ia, ib)
  assert va.shape == (64, 8, 3, 32, 32) and ia.shape == (64,)
  assert set(ia.tolist()) == set(range(procedural.NUM_CLASSES))
  vc, _ = next(procedural.batch_iterator(64, seed=4))
  assert not np.array_equal(va, vc)
  small, _ = next(procedural.batch_iterator(2, seed=0, num_frames=4, height=16, width=24))
  assert small.shape == (2, 4, 3, 16, 24)


def test_class_names():
  assert len(set(procedural.CLASS_NAMES)) == procedural.NUM_CLASSES == 8
  assert procedural.class_name(0) == procedural.CLASS_NAMES[0] == "red square moving right"


def test_class_embeddings_have_a_null_row():
  table = procedural.class_embeddings(8, 4, 16, seed=0)
  assert table.shape == (9, 4, 16)
  assert np.all(table[-1] == 0) and np.all(np.abs(table[:-1]).sum((1, 2)) > 0)
  np.testing.assert_array_equal(table, procedural.class_embeddings(8, 4, 16, seed=0))


def test_class_embeddings_are_unit_variance_and_seeded():
  table = procedural.class_embeddings(8, 16, 64, seed=0)
  assert table.dtype == np.float32
  assert abs(table[:-1].std() - 1) < 0.05 and abs(table[:-1].mean()) < 0.05
  assert not np.array_equal(table, procedural.class_embeddings(8, 16, 64, seed=1))


@pytest.mark.parametrize("ids,kwargs", [(np.array([99]), {}), (np.array([-1]), {}),
                                        (np.array([0.5]), {}), (np.array([0]), {"height": 30}),
                                        (np.array([0]), {"width": 12}),
                                        (np.array([0]), {"num_frames": 0})])
def test_bad_arguments_are_refused(ids, kwargs):
  with pytest.raises(ValueError):
    procedural.sample_videos(ids, np.random.default_rng(0), **kwargs)


def test_to_uint8_maps_the_range_and_greys():
  video = np.stack([np.full((1, 2, 2), -1.0), np.full((1, 2, 2), 1.0)])  # (F=2, C=1, 2, 2)
  out = gif.to_uint8(video)
  assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8
  assert np.all(out[0] == 0) and np.all(out[1] == 255)
  assert gif.to_uint8(np.full((1, 3, 1, 1), 5.0)).max() == 255, "clipped, not wrapped"
  with pytest.raises(ValueError):
    gif.to_uint8(np.zeros((1, 2, 4, 4)))


def test_side_by_side_layout_and_gif_round_trip(tmp_path):
  fp = procedural.sample_videos([0], np.random.default_rng(0))[0]
  frames = gif.side_by_side([fp, -fp], scale=3, gap=2)
  assert frames.shape == (8, 96, 3 * 32 * 2 + 2, 3)
  np.testing.assert_array_equal(frames[:, :, 96:98], 255)
  np.testing.assert_array_equal(frames[:, ::3, :96:3], gif.to_uint8(fp))
  path = str(tmp_path / "v.gif")
  gif.save_gif(path, frames, fps=5)
  with Image.open(path) as im:
    assert (im.n_frames, im.size, im.info["duration"]) == (8, (194, 96), 200)
    im.seek(5)
    # GIF has a 256-colour palette: close, not exact.
    assert np.abs(np.asarray(im.convert("RGB"), np.int32) - frames[5]).mean() < 4
  with pytest.raises(ValueError, match="shape"):
    gif.side_by_side([fp, fp[:4]])
