"""Calibration data for S²Q-VDiT: Hessian-aware salience and sample selection."""
from s2q_jax.calibration.salience import (diffusion_salience, hvp, layer_salience,
                                          quant_salience)
from s2q_jax.calibration.selection import minmax_normalize, salient_scores, select_indices

__all__ = ["diffusion_salience", "hvp", "layer_salience", "minmax_normalize", "quant_salience",
           "salient_scores", "select_indices"]
