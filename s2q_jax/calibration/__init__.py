"""Calibration for S²Q-VDiT: Hessian-aware salience, sample selection, GPTQ."""
from s2q_jax.calibration.gptq import accumulate_hessian, gptq_quantize
from s2q_jax.calibration.salience import (diffusion_salience, hvp, layer_salience,
                                          quant_salience)
from s2q_jax.calibration.selection import minmax_normalize, salient_scores, select_indices

__all__ = ["accumulate_hessian", "diffusion_salience", "gptq_quantize", "hvp",
           "layer_salience", "minmax_normalize", "quant_salience", "salient_scores", "select_indices"]
