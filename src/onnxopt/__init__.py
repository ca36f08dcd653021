"""onnxopt: an ONNX optimizer with fused int8 kernels for onnxruntime."""
from .api import optimize, save
from .errors import (CalibrationError, InvalidModelError, OptimizeError, PassOptionError, UnknownPassError,
                     UnsupportedModelError, VerificationError)
from .passes import (Pass, PassContext, PassManager, Report, RewriteRule, get_pass, list_passes, list_presets,
                     register_pass, register_preset)

__version__ = "0.1.0"

__all__ = ["optimize", "save", "Pass", "PassContext", "PassManager", "Report", "RewriteRule", "get_pass",
           "list_passes", "list_presets", "register_pass", "register_preset", "OptimizeError",
           "InvalidModelError", "UnsupportedModelError", "UnknownPassError", "PassOptionError", "CalibrationError",
           "VerificationError"]
