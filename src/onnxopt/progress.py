"""Progress bars for the slow parts (calibration, the guard's timings, bench rounds): tqdm on stderr,
drawn only when stderr is a terminal and the run is not quiet (`onnxopt ... --quiet`), so a pipe, a
log file or a --quiet run gets none of it. A leaf module: imports nothing of onnxopt."""
from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    """No bars at all for the rest of the process (the CLI's --quiet)."""
    global _quiet
    _quiet = bool(quiet)


def enabled() -> bool:
    err = sys.stderr
    return not _quiet and err is not None and hasattr(err, "isatty") and err.isatty()


class _Silent:
    """What bar() gives when nothing is drawn: iterates and accepts tqdm's calls, prints nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix_str(self, text="", refresh=True):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", show: bool = True, leave: bool = False):
    """A tqdm bar over `iterable` (or counting to `total`) on stderr, or a silent stand-in when
    `show` is false, the run is quiet, stderr is not a terminal or tqdm is not installed."""
    if not (show and enabled()):
        return _Silent(iterable)
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety: without tqdm the work runs the same, silently
        return _Silent(iterable)
    return tqdm(iterable, total=total, desc=f"[onnxopt] {desc}", unit=unit, file=sys.stderr, leave=leave,
                dynamic_ncols=True)
