"""Video quality metrics against closed forms and direct computations."""
import numpy as np
import pytest

from s2q_jax.evaluation import metrics


def _videos(seed=0, shape=(2, 5, 3, 16, 16)):
  return np.tanh(np.random.default_rng(seed).standard_normal(shape))


def test_psnr_matches_definition():
  ref = _videos()
  test = np.clip(ref + 0.05 * np.random.default_rng(1).standard_normal(ref.shape), -1, 1)
  expected = [20 * np.log10(2.0 / np.sqrt(np.mean((r - t) ** 2))) for r, t in zip(ref, test)]
  np.testing.assert_allclose(metrics.psnr(ref, test), expected, rtol=1e-10)
  assert np.all(np.isinf(metrics.psnr(ref, ref)))


def test_ssim_of_constant_frames_has_closed_form():
  # For constant images all variances vanish: SSIM = (2ab + C1) / (a² + b² + C1).
  a, b = 0.3, -0.2
  ref = np.full((1, 2, 1, 12, 12), a)
  test = np.full((1, 2, 1, 12, 12), b)
  c1 = (0.01 * 2.0) ** 2
  np.testing.assert_allclose(metrics.ssim(ref, test), (2 * a * b + c1) / (a * a + b * b + c1))


def test_ssim_identity_symmetry_and_monotone_in_noise():
  ref = _videos()
  np.testing.assert_allclose(metrics.ssim(ref, ref), 1.0)
  noise = np.random.default_rng(2).standard_normal(ref.shape)
  scores = [metrics.ssim(ref, np.clip(ref + s * noise, -1, 1)).mean() for s in (0.02, 0.1, 0.5)]
  assert scores[0] > scores[1] > scores[2]
  t = np.clip(ref + 0.1 * noise, -1, 1)
  np.testing.assert_allclose(metrics.ssim(ref, t), metrics.ssim(t, ref))


def test_temporal_consistency_reads_motion():
  ref = _videos(shape=(1, 6, 3, 8, 8)) * 0.5
  np.testing.assert_allclose(metrics.temporal_consistency(ref, ref), 1.0)
  # Same motion at a different amplitude and offset is still consistent.
  np.testing.assert_allclose(metrics.temporal_consistency(ref, 0.5 * ref + 0.1), 1.0)
  # Time-reversed motion: frame differences change sign.
  reversed_motion = ref[:, ::-1]
  first = metrics.temporal_consistency(ref[:, :2], reversed_motion[:, -2:])
  np.testing.assert_allclose(first, -1.0)
  static = np.repeat(ref[:, :1], 6, axis=1)
  np.testing.assert_allclose(metrics.temporal_consistency(ref, static), 0.0)
  np.testing.assert_allclose(metrics.temporal_consistency(static, static), 1.0)


def test_summarize_averages_over_videos():
  ref = _videos()
  test = np.clip(ref + 0.1, -1, 1)
  out = metrics.summarize(ref, test)
  assert out["psnr"] == pytest.approx(float(np.mean(metrics.psnr(ref, test))))
  assert set(out) == {"psnr", "ssim", "temporal_consistency"}


def test_standard_errors_of_the_means_over_videos():
  ref = _videos()
  test = np.clip(ref + np.random.default_rng(1).normal(0, 0.05, ref.shape), -1, 1)
  scores = metrics.per_video(ref, test)
  se = metrics.standard_errors(scores)
  n = len(ref)
  assert se["psnr"] == pytest.approx(np.std(metrics.psnr(ref, test), ddof=1) / np.sqrt(n))
  assert se["ssim"] == pytest.approx(np.std(metrics.ssim(ref, test), ddof=1) / np.sqrt(n))
  # an identical video (inf PSNR) or a single video: no finite spread
  assert metrics.standard_errors({"psnr": np.array([30.0, np.inf])})["psnr"] is None
  assert metrics.standard_errors({"psnr": np.array([30.0])})["psnr"] is None
