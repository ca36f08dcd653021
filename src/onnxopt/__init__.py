"""onnxopt: an ONNX optimizer with fused int8 kernels for onnxruntime."""
from .api import optimize, save
from .errors import (CalibrationError, InvalidModelError, OptimizeError, PassOptionError, UnknownPassError,
                     UnsupportedModelError, VerificationError)
from . import schemas as _schemas  # noqa: F401,E402  (registers the com.onnxopt op schemas with onnx)
from .passes import (Pass, PassContext, PassManager, Report, RewriteRule, get_pass, list_passes, list_presets,
                     register_pass, register_preset)

from .runtime import CustomOpsUnavailableError, InferenceSession, custom_ops_library, register_custom_ops

__version__ = "0.1.0"

__all__ = ["optimize", "save", "Pass", "PassContext", "PassManager", "Report", "RewriteRule", "get_pass",
           "list_passes", "list_presets", "register_pass", "register_preset", "OptimizeError",
           "InvalidModelError", "UnsupportedModelError", "UnknownPassError", "PassOptionError", "CalibrationError",
           "VerificationError", "InferenceSession", "custom_ops_library", "register_custom_ops",
           "CustomOpsUnavailableError"]
