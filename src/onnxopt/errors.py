"""The one family of errors onnxopt raises for bad input. The CLI prints `str(err)` and exits 2."""


class OptimizeError(Exception):
    """Base class: something about the input or the request is wrong; nothing was written."""


class InvalidModelError(OptimizeError):
    """The input is not a valid ONNX model (not protobuf, truncated, fails the checker)."""


class UnsupportedModelError(OptimizeError):
    """A valid model that onnxopt cannot handle (opset too old, unknown IR version...)."""


class UnknownPassError(OptimizeError, KeyError):
    """A pass or preset name that is not registered."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown pass"


class PassOptionError(OptimizeError):
    """A pass was configured with options it does not accept or values out of range."""


class CalibrationError(OptimizeError):
    """Calibration data missing or not matching the model's inputs (names, dtypes, shapes)."""


class VerificationError(OptimizeError):
    """verify=True found outputs that differ; names the first pass that broke them."""

    def __init__(self, message, pass_name=None, max_abs_diff=None):
        super().__init__(message)
        self.pass_name = pass_name
        self.max_abs_diff = max_abs_diff
