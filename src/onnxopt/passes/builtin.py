"""Registers the built-in passes and presets.

Each pass module registers its passes on import and lists, in `DEFAULT`, the ones that belong in the
"default" preset, in order: cleanup first (so fusions see through Identity/Constant nodes), then
folding, then fusions, and analysis (shape refresh) last. The manager repeats this exact group to a
fixed point.
"""
from . import cleanup, fold, fusion, prune, quantize  # noqa: F401  (prune and quantize register their passes)
from .base import _REGISTRY, get_pass, pass_class, register_preset
from .quantize import guard

DEFAULT = [*cleanup.DEFAULT, *fold.DEFAULT, *fusion.DEFAULT]
DEFAULT.sort(key=lambda name: pass_class(name).kind == "analysis")  # stable: only moves analysis last
register_preset("default", DEFAULT)
# int8: the exact pipeline first (Constant/Identity/BatchNorm gone, so real exports quantize fully;
# it leaves Q/DQ alone), QAT import when the model carries QDQ, then static quantization when
# calibration data is given (with the accuracy and cost guards on), dynamic otherwise.
register_preset("int8", ["default", "import_qdq",
                         get_pass("quantize_auto", tolerance=dict(guard.DEFAULT_TOLERANCE), autotune=True),
                         "fuse_qconv_residual"])

BUILTIN = frozenset(_REGISTRY)  # what onnxopt itself registers, before any user code runs
