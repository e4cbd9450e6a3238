"""The embedded model's procedural training videos."""
import numpy as np
import pytest

from s2q_jax.data import procedural


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


def test_class_embeddings_have_a_null_row():
  table = procedural.class_embeddings(8, 4, 16, seed=0)
  assert table.shape == (9, 4, 16)
  assert np.all(table[-1] == 0) and np.all(np.abs(table[:-1]).sum((1, 2)) > 0)
  np.testing.assert_array_equal(table, procedural.class_embeddings(8, 4, 16, seed=0))


def test_bad_class_id_is_refused():
  with pytest.raises(ValueError, match="class ids"):
    procedural.sample_videos(np.array([99]), np.random.default_rng(0))
