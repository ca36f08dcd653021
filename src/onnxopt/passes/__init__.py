"""Built-in passes. Importing this package registers them and the presets."""
from .base import (Pass, PassContext, PassManager, PassRecord, Report, get_pass, list_passes, list_presets,
                   register_pass, register_preset, resolve)
from .pattern import RewriteRule
from . import builtin  # noqa: F401  (registers passes and presets)

__all__ = ["Pass", "PassContext", "PassManager", "PassRecord", "Report", "RewriteRule", "get_pass", "list_passes",
           "list_presets", "register_pass", "register_preset", "resolve"]
