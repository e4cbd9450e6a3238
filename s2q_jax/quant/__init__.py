"""Quantization core: quantizers, the fake-quantized Linear, layer rules and storage accounting.

We do not build on qwix's op interception: S²Q-VDiT learns per-layer state
(clipping, smoothing, rotations, GPTQ-fixed integer codes) that must fold
into exactly the integers deployment stores, at 6-bit activations, so each
quantized layer is an explicit `QuantLinear` module swapped into the graph.
"""
from s2q_jax.quant.apply import (LayerInfo, freeze_all, iter_linears, quantize_model,
                                 quantized_layers)
from s2q_jax.quant.qlinear import (Codes, QuantLinear, QuantParam, Rotation, SmoothScale,
                                   WeightClip)
from s2q_jax.quant.quantizer import (check_bits, fake_quant_activations, qrange, quantize,
                                     weight_scales)
from s2q_jax.quant.rules import QuantRule, make_rules, match, parse_bits, rules_from_config

__all__ = [
    "Codes", "LayerInfo", "QuantLinear", "QuantParam", "QuantRule", "Rotation", "SmoothScale",
    "WeightClip", "check_bits", "fake_quant_activations", "freeze_all", "iter_linears",
    "make_rules", "match", "parse_bits", "qrange", "quantize", "quantize_model",
    "quantized_layers", "rules_from_config", "weight_scales",
]
