"""Quantization core: quantizers, the fake-quantized Linear, layer rules and model surgery.

Storage accounting of a quantized model lives in `s2q_jax.deploy.storage_bytes`,
measured from the exact tensors the deployed checkpoint writes.

Why not qwix (checked: qwix 0.1.8). qwix has most of the vocabulary — rules
by module-path regex, `int2`..`int8` qtypes, per-channel weights, dynamic
activation scales, PTQ, and SmoothQuant/Hadamard/GPTQ/AWQ calibration
providers in `contrib` — but it works by intercepting `dot_general` inside
modules and keeps its state in its own collections. S²Q-VDiT needs per-layer
state that is trained by block reconstruction and then fixed: a learnable
per-output-channel clipping factor (qwix only has a static `absmax,<c>` factor
per rule), learnable smoothing folded into the weights, and GPTQ integer codes
chosen by our own Hessians, all of which must be exactly the integers and
scales our packed-int4 × int6 kernels deploy. qwix's symmetric sub-byte grid
also differs from ours (it maps absmax to 2^(b-1) - 0.5, i.e. 31.5 for int6,
where the kernels use 31). An explicit `QuantLinear` swapped into the NNX graph
gives typed, optimisable Variables and a one-to-one fold into deployment, so
we do not depend on qwix.
"""
from s2q_jax.quant.apply import (LayerInfo, freeze_all, iter_linears, quantize_model,
                                 quantized_layers, replace_module)
from s2q_jax.quant.qlinear import (ActClip, ChannelShift, Codes, KroneckerFactor, QuantLinear,
                                   QuantParam, Rotation, SmoothScale, WeightClip)
from s2q_jax.quant.quantizer import (activation_scales, check_bits, fake_quant_activations,
                                     fake_quant_weights, qrange, quantize, round_ste,
                                     weight_scales)
from s2q_jax.quant.rules import (DEFAULT_KEEP_FP, QuantRule, make_rules, match, parse_bits,
                                 rules_from_config)

__all__ = [
    "ActClip", "ChannelShift", "Codes", "DEFAULT_KEEP_FP", "KroneckerFactor", "LayerInfo",
    "QuantLinear", "QuantParam",
    "QuantRule",
    "Rotation", "SmoothScale", "WeightClip", "activation_scales", "check_bits",
    "fake_quant_activations", "fake_quant_weights", "freeze_all", "iter_linears", "make_rules",
    "match", "parse_bits", "qrange", "quantize", "quantize_model", "quantized_layers",
    "replace_module", "round_ste", "rules_from_config", "weight_scales",
]
