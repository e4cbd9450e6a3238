"""Selection that covers the trajectory: bands and quotas, the x̂₀ salience, null-prompt twins,
and the report's histogram, each against a direct computation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax.calibration.pool import build_pool
from s2q_jax.calibration.selection import band_quotas, salient_scores, stratified_indices
from s2q_jax.errors import UserError
from s2q_jax.evaluation import report as report_lib
from s2q_jax.job_config import base_config
from s2q_jax.methods.calibration_data import calibration_data, num_positions
from s2q_jax.models import CogVideoXTransformer3D
from s2q_jax.sampling import ddim_step, make_schedule, predicted_x0
from tiny import ONE_BLOCK


@pytest.mark.parametrize("sizes, n, weights, expected", [
    ([40] * 5, 20, None, [4] * 5),
    ([40] * 5, 23, None, [5, 5, 5, 4, 4]),  # remainders to the earliest bands
    ([2, 40, 40, 0, 40], 23, None, [2, 8, 7, 0, 6]),  # a small band's overflow moves on
    ([10, 10], 6, [1.0, 2.0], [2, 4]),
    ([10, 3], 12, [0.0, 1.0], [9, 3]),  # a full band's share goes to the others
])
def test_band_quotas(sizes, n, weights, expected):
  q = band_quotas(np.array(sizes), n, None if weights is None else np.array(weights))
  assert q.tolist() == expected and q.sum() == n


def test_stratified_selection_ranks_within_each_band():
  rng = np.random.default_rng(0)
  steps = np.repeat(np.arange(10), 4)  # 10 steps × 4 prompts, step-major like the pool
  c_diff = np.linspace(0.0, 1.0, 40) ** 4  # rises to the last step, as on CogVideoX
  c_quant = rng.uniform(size=40)
  chosen = stratified_indices(c_diff, c_quant, steps, 10, 10, bands=5)
  assert np.bincount(steps[chosen] // 2, minlength=5).tolist() == [2] * 5
  for band in range(5):
    members = np.flatnonzero(steps // 2 == band)
    top = members[np.argsort(-salient_scores(c_diff[members], c_quant[members]),
                             kind="stable")[:2]]
    assert sorted(top) == sorted(set(chosen) & set(members))
  # The literal global ranking would take the last steps only.
  global_top = np.argsort(-salient_scores(c_diff, c_quant), kind="stable")[:10]
  assert steps[global_top].min() >= 5


def test_salience_quota_follows_the_band_means():
  steps = np.repeat(np.arange(4), 5)
  c_diff = np.repeat([1.0, 1.0, 2.0, 4.0], 5)
  chosen = stratified_indices(c_diff, np.ones(20), steps, 4, 8, bands=2, quota="salience")
  assert np.bincount(steps[chosen] // 2, minlength=2).tolist() == [2, 6]  # means 1 : 3


def test_more_bands_than_steps_and_bad_arguments():
  steps = np.repeat(np.arange(3), 2)
  chosen = stratified_indices(np.arange(6.0), np.ones(6), steps, 3, 3, bands=10)
  assert np.bincount(steps[chosen]).tolist() == [1, 1, 1]
  with pytest.raises(ValueError, match="non-negative integer"):
    stratified_indices(np.ones(6), np.ones(6), steps, 3, 3, bands=-1)
  with pytest.raises(ValueError, match="band quota"):
    stratified_indices(np.ones(6), np.ones(6), steps, 3, 3, bands=1, quota="magic")


def test_zero_bands_gives_one_band_per_sample():
  steps = np.repeat(np.arange(12), 3)
  c_diff = np.linspace(0.0, 1.0, 36) ** 4
  chosen = stratified_indices(c_diff, np.ones(36), steps, 12, 4, bands=0)
  # 4 bands of 3 steps, one sample each: the latest step of each band (C_diff rises).
  assert steps[chosen].tolist() == [2, 5, 8, 11]


def test_spread_bands_take_evenly_spaced_steps_and_rank_prompts_within_each():
  rng = np.random.default_rng(5)
  num_steps, num_prompts = 12, 3
  steps = np.repeat(np.arange(num_steps), num_prompts)
  c_diff = np.linspace(0.0, 1.0, num_steps)[steps] ** 4 + 0.01 * rng.random(steps.size)
  c_quant = rng.random(steps.size)
  chosen = stratified_indices(c_diff, c_quant, steps, num_steps, 4, bands=0, layout="spread")
  # round(linspace(0, 11, 4)) = 0, 4, 7, 11: the noisiest and the last step both in.
  assert steps[chosen].tolist() == [0, 4, 7, 11]
  for i in chosen:  # within its step, the best C̄_diff · C̄_quant of that step alone
    at = np.flatnonzero(steps == steps[i])
    assert i == at[np.argmax(salient_scores(c_diff[at], c_quant[at]))]
  every = stratified_indices(c_diff, c_quant, steps, num_steps, 12, bands=0, layout="spread")
  assert np.bincount(steps[every]).tolist() == [1] * num_steps
  with pytest.raises(ValueError, match="band layout"):
    stratified_indices(c_diff, c_quant, steps, num_steps, 4, bands=0, layout="even")


def test_prompt_cap_spreads_samples_over_prompts():
  rng = np.random.default_rng(3)
  num_steps, num_prompts = 10, 4
  steps = np.repeat(np.arange(num_steps), num_prompts)
  prompts = np.tile(np.arange(num_prompts), num_steps)
  c_diff = rng.uniform(size=40)
  c_quant = np.where(prompts == 2, 100.0, 1.0) + rng.uniform(size=40)  # prompt 2 dominates
  uncapped = stratified_indices(c_diff, c_quant, steps, num_steps, 8, bands=8)
  assert np.sum(prompts[uncapped] == 2) >= 6
  chosen = stratified_indices(c_diff, c_quant, steps, num_steps, 8, bands=8, prompts=prompts)
  assert np.bincount(prompts[chosen], minlength=4).tolist() == [2, 2, 2, 2]
  band = steps * 8 // num_steps
  assert np.bincount(band[chosen], minlength=8).tolist() == [1] * 8
  # Each band's choice is its best candidate among the prompts still under the cap, taken
  # in order of score: brute-force the same rule.
  score = np.full(40, -np.inf)
  for b in range(8):
    m = np.flatnonzero(band == b)
    score[m] = salient_scores(c_diff[m], c_quant[m])
  used, open_bands, expected = np.zeros(4, int), set(range(8)), []
  for i in np.argsort(-score, kind="stable"):
    if band[i] in open_bands and used[prompts[i]] < 2:
      expected.append(i), open_bands.discard(band[i])
      used[prompts[i]] += 1
  assert sorted(expected) == chosen.tolist()


def test_prompt_cap_gives_way_when_a_band_has_no_other_prompt():
  steps = np.repeat(np.arange(4), 2)
  prompts = np.array([0, 1, 0, 1, 0, 0, 0, 0])  # steps 2 and 3 hold prompt 0 only
  chosen = stratified_indices(np.ones(8), np.ones(8), steps, 4, 4, bands=4, prompts=prompts)
  assert np.bincount(steps[chosen], minlength=4).tolist() == [1, 1, 1, 1]


def test_pool_prompt_index_follows_the_step_major_order(pool):
  idx = pool.prompt_index()
  assert idx.tolist() == [0, 1, 0, 1, 0, 1]
  for p in (0, 1):
    np.testing.assert_array_equal(pool.conditions[idx == p], pool.conditions[[p] * 3])
  with pytest.raises(ValueError, match="step-major"):
    pool.take(np.array([1, 2, 3])).prompt_index()


def test_predicted_x0_inverts_the_ddim_step():
  schedule = make_schedule(num_inference_steps=7)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((7, 2, 3)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((7, 2, 3)), jnp.float32)
  steps = jnp.arange(7)
  x_prev = jnp.stack([ddim_step(schedule, v[i], i, x[i]) for i in range(7)])
  sqrt_a, sqrt_b = (np.asarray(schedule.coefficients)[:, i, None, None] for i in (0, 1))
  expected = sqrt_a * np.asarray(x) - sqrt_b * np.asarray(v)  # x̂₀ of a v-prediction
  np.testing.assert_allclose(predicted_x0(schedule, steps, x, x_prev), expected, atol=2e-4)


@pytest.fixture(scope="module")
def pool():
  model = CogVideoXTransformer3D(ONE_BLOCK, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  cond = rng.standard_normal((2, 4, 16)).astype(np.float32)
  noise = rng.standard_normal((2, 2, 3, 8, 8)).astype(np.float32)
  null = np.full((4, 16), 0.5, np.float32)
  return build_pool(model, cond, null, noise, num_steps=3, guidance_scale=3.0)


def test_pool_x0_change_compares_consecutive_predictions(pool):
  schedule = make_schedule(num_inference_steps=3)
  x0 = np.asarray(predicted_x0(schedule, jnp.asarray(pool.steps), jnp.asarray(pool.latents),
                               jnp.asarray(pool.previous)), np.float64)
  final = pool.previous[pool.steps == 2]  # the last step's output is the sample itself
  nxt = np.concatenate([x0[2:], final])  # the same prompt's prediction one step later
  change = ((x0 - nxt) ** 2).sum(axis=(1, 2, 3, 4)) / (x0 ** 2).sum(axis=(1, 2, 3, 4))
  np.testing.assert_allclose(pool.x0_change, change, rtol=1e-4)
  np.testing.assert_allclose(x0[pool.steps == 2], final, atol=1e-5)  # last step: x̂₀ = x_0


def test_calibration_data_twins_and_histogram(pool):
  cfg = base_config(4, 6, "s2q")
  cfg.sampler.guidance_scale = 3.0
  data, summary = calibration_data(pool, np.array([0, 3, 5]), cfg)
  assert len(data) == 6 and summary["uncond"] == 3
  np.testing.assert_array_equal(data.latents[3:], data.latents[:3])
  np.testing.assert_array_equal(data.conditions[3:], np.broadcast_to(pool.null_condition,
                                                                     (3, 4, 16)))
  np.testing.assert_array_equal(data.conditions[:3], pool.conditions[[0, 3, 5]])
  assert summary["step_histogram"] == [2, 2, 2]  # positions 0, 3, 5 are steps 0, 1, 2
  cfg.calib.uncond = False
  data, summary = calibration_data(pool, np.array([0, 3]), cfg)
  assert len(data) == 2 and summary["uncond"] == 0


def test_no_null_prompt_twins_where_the_sampler_never_ran_the_null_prompt(pool):
  # A model that embeds its guidance (HunyuanVideo) samples with no null-prompt pass at any
  # sampler.guidance_scale: the pool says so, and calibration follows the pool.
  assert pool.sampled_uncond and float(pool.guidance_scale) == 3.0
  unguided = dataclasses.replace(pool, guidance_scale=1.0)
  cfg = base_config(4, 6, "s2q")
  cfg.sampler.guidance_scale = 6.0
  cfg.calib.num_samples = 3  # odd is fine: no twins to pair with
  data, summary = calibration_data(unguided, np.array([0, 3, 5]), cfg)
  assert len(data) == 3 and summary["uncond"] == 0
  assert num_positions(cfg, unguided) == 3
  with pytest.raises(UserError, match="must be even"):
    num_positions(cfg, pool)


def test_report_shows_the_selection_histogram():
  calibration = {"num_candidates": 6, "devices": 1, "selection": {
      "positions": [0, 3], "step_histogram": [2, 0, 2], "uncond": 2}}
  lines = "\n".join(report_lib._calibration_markdown(calibration))
  assert "2 of 6 candidate steps selected: 4 model inputs, 2 of them with the null prompt" in lines
  assert "| inputs | 2 | 0 | 2 |" in lines


def test_the_job_setting_chooses_the_band_layout(pool):
  from s2q_jax.methods.s2q import select_positions  # pylint: disable=import-outside-toplevel
  model = CogVideoXTransformer3D(ONE_BLOCK, rngs=nnx.Rngs(0))
  cfg = base_config(4, 6, "s2q")
  cfg.calib.num_samples = 4  # 2 positions and their null-prompt twins, of 3 steps
  cfg.calib.band_layout = "spread"
  chosen = select_positions(model, pool, cfg, log=lambda *_: None)
  assert np.bincount(pool.steps[chosen], minlength=3).tolist() == [1, 0, 1]  # first and last
  cfg.calib.band_layout = "even"
  with pytest.raises(UserError, match="band layout 'even'"):
    select_positions(model, pool, cfg, log=lambda *_: None)
