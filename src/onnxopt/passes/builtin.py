"""Registers the built-in passes and presets.

Each pass module registers its passes on import and lists, in `DEFAULT`, the ones that belong in the
"default" preset, in order: cleanup first (so fusions see through Identity/Constant nodes), then
folding, then fusions, and analysis (shape refresh) last. The manager repeats this exact group to a
fixed point.
"""
# convtranspose, prune and quantize register their passes on import
from . import cleanup, convtranspose, fold, fusion, ortfix, prune, quantize  # noqa: F401
from .base import _REGISTRY, get_pass, pass_class, register_preset
from .quantize import guard

DEFAULT = [*cleanup.DEFAULT, *fold.DEFAULT, *fusion.DEFAULT]
DEFAULT.sort(key=lambda name: pass_class(name).kind == "analysis")  # stable: only moves analysis last
register_preset("default", DEFAULT)
# int8: the exact pipeline first (Constant/Identity/BatchNorm gone, so real exports quantize fully;
# it leaves Q/DQ alone), QAT import when the model carries QDQ, then static quantization when
# calibration data is given (with the accuracy and cost guards on), dynamic otherwise, then the
# embedding tables.
# quantize_embeddings runs after quantize_auto, not before: the guard takes the graph it is handed as
# its fp32 reference (it exports the current graph, calibrates on it and judges every int8 candidate
# against it), so int8 tables placed before it would become part of "fp32": its held-out fidelity
# and its "nothing worth quantizing: the result is the optimized fp32 model" would then describe a
# model whose embeddings are already int8. Placed after, the guard's numbers stay about what it
# decided (the MatMul/Gemm/Conv sites against the real float graph), the tables shrink whether or not
# int8 GEMMs pay on this machine, and a table tied to a MatMul (an LM head) is free by then when
# quantize_auto gave that MatMul its own int8 copy. What judges the whole result, embeddings included,
# is optimize()'s fidelity measurement and verify=True: both run the original model against the
# final one, whatever the order of the passes.
# ConvTranspose is quantized by quantize_auto itself, site by site, through convtranspose_to_conv's
# rewrite (QConv + DepthToSpace + Slice); the preset does not run convtranspose_to_conv before it.
# The float rewrite is not reliably faster than onnxruntime's own ConvTranspose (measured, 1 thread,
# 64->32 channels on 56x56: 4x4 stride 2 pad 1 1.88 ms against 2.19 ms, but 3x3 stride 2 pad 1
# output_padding 1 1.68 ms against 1.28 ms: ceil(3/2) = 2 taps per phase is 16/9 the multiply-adds),
# so rewriting every ConvTranspose first would leave the ones the guards keep in fp32 slower than the
# original, and the cost guard would time each int8 candidate against that rewritten Conv instead of
# the ConvTranspose it replaces. As a site rooted at the ConvTranspose, the guards' fp32 side is the
# real ConvTranspose (timing and fidelity), and a site they return to fp32 is never rewritten.
# avoid_skip_layernorm last: it measures onnxruntime's fused SkipLayerNormalization against the
# unfused pair on this machine before it rewrites (BERT-base int8: 24 of them, ~10 ms of 48 ms).
register_preset("int8", ["default", "import_qdq",
                         get_pass("quantize_auto", tolerance=dict(guard.DEFAULT_TOLERANCE), autotune=True),
                         "quantize_embeddings", "fuse_qconv_residual", "chain_qconv_u8", "avoid_skip_layernorm"])

BUILTIN = frozenset(_REGISTRY)  # what onnxopt itself registers, before any user code runs
