"""Registers the built-in passes and presets.

Each pass module registers its passes on import and lists, in `DEFAULT`, the ones that belong in the
"default" preset, in order. Cleanup comes first (so fusions see through Identity/Constant nodes),
then folding, then fusions; the manager repeats the exact group to a fixed point.
"""
import importlib

from .base import register_preset

_MODULES = ["cleanup", "fold", "fusion"]

DEFAULT = []
for _name in _MODULES:
    try:
        _mod = importlib.import_module(f".{_name}", __package__)
    except ModuleNotFoundError as exc:  # a module not written yet
        if exc.name != f"{__package__}.{_name}":
            raise
        continue
    DEFAULT.extend(getattr(_mod, "DEFAULT", []))

register_preset("default", DEFAULT)
