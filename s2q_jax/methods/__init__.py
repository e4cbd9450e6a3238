"""Quantization methods: each calibrates a model whose layers `quant.quantize_model` swapped.

A method's `calibrate(q_model, fp_model, pool, cfg, workdir, mesh, log)` may change
the quantized layers in place (add transforms, swap layer classes, learn
parameters, freeze codes) and returns what the report should say about it.
RTN has no calibration: the job freezes round-to-nearest codes directly.
"""
from s2q_jax.methods import q_vdit, qvd, s2q, vidit_q

CALIBRATORS = {"rtn": None, "vidit_q": vidit_q.calibrate, "q_vdit": q_vdit.calibrate,
               "qvd": qvd.calibrate, "s2q": s2q.calibrate}
METHODS = tuple(CALIBRATORS)
