"""External data of untrusted models: where it may be read from, how it is read, where it is written.

Reading follows onnx's rules (onnx docs/security.md; onnx.load and onnx.checker enforce the same):
a tensor's `location` is relative, non-empty, and its canonical path lies inside the model's folder;
the file is a regular file, not a symbolic link, with one hard link; it is opened with O_NOFOLLOW and
the opened file must be the one that was checked (device and inode), so a swap between check and open
is caught. Offsets and lengths must lie inside the file. Messages read like onnx's, and the error is
both an `onnxopt.InvalidModelError` and an `onnx.checker.ValidationError`.

onnxopt keeps weights lazy: a checked tensor is referred to by a *marker* location
("/onnxopt-lazy/<token> (... write this model with onnxopt.save)") that only this process can
resolve (the token maps to a checked file in `_CHECKED`; a marker from anywhere else is refused). A
marker is an absolute path on purpose: onnx and onnxruntime refuse it, so a lazy reference can never
silently become a file that points somewhere else, and onnx's error quotes the way out.

Writing never follows anything that exists: data goes to a fresh temp file in the output folder
(O_EXCL) and is renamed over the destination, which replaces a symbolic or hard link instead of
writing through it. The data file's name is the model file's name + ".data", inside its folder.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import stat
from typing import BinaryIO, Dict, Iterable, Optional, Tuple

import onnx

from .errors import InvalidModelError

MARKER_PREFIX = "/onnxopt-lazy/"
MARKER_NOTE = " (weights kept on disk by onnxopt: write this model with onnxopt.save)"
CHUNK = 16 << 20  # bytes copied at a time when streaming: bounds save's memory


class ExternalDataError(InvalidModelError, onnx.checker.ValidationError):
    """External data that onnx itself would refuse (outside the folder, link, out of bounds...)."""


@dataclasses.dataclass(frozen=True)
class CheckedFile:
    """An external-data file that passed the containment checks: canonical path and identity."""
    path: str
    device: int
    inode: int
    size: int


_CHECKED: Dict[str, CheckedFile] = {}  # marker token -> file; lives as long as the process
_TOKENS: Dict[Tuple[int, int, str], str] = {}  # (device, inode, path) -> token, one per file


def _error(tensor: str, text: str) -> ExternalDataError:
    return ExternalDataError(f"Data of TensorProto ( tensor name: {tensor}) {text}")


def check_location(base_dir: str, location: str, tensor: str) -> CheckedFile:
    """The canonical file `location` names inside `base_dir`, refused as onnx refuses it."""
    if not location:
        raise ExternalDataError(f"Location of external TensorProto ( tensor name: {tensor}) should not be empty.")
    if os.path.isabs(location) or os.path.splitdrive(location)[0]:
        raise ExternalDataError(f"Location of external TensorProto ( tensor name: {tensor}) should be a relative "
                                f"path, but it is an absolute path: {location}")
    if "\0" in location:
        raise _error(tensor, f"has a location with a NUL byte: {location!r}")
    base = os.path.realpath(base_dir)
    full = os.path.join(base, location)
    canonical = os.path.realpath(full)
    try:
        st = os.lstat(full)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise _error(tensor, f"should be stored in {full}, but it is a symbolic link.")
    if os.path.commonpath([base, canonical]) != base:
        raise _error(tensor, f"should be file inside '{base}', but '{location}' points outside the directory.")
    if st is None:
        raise _error(tensor, f"should be stored in {full}, but it is not regular file.")
    if not stat.S_ISREG(st.st_mode):
        raise _error(tensor, f"should be stored in {full}, but it is not regular file.")
    if st.st_nlink > 1:
        raise _error(tensor, f"should be stored in {full}, but it has multiple hard links, indicating a "
                             "potential hardlink attack.")
    return CheckedFile(canonical, st.st_dev, st.st_ino, st.st_size)


def check_bounds(file: CheckedFile, offset: int, length: int, tensor: str, location: str) -> None:
    if offset < 0 or length < 0:
        raise _error(tensor, f"has a negative external offset ({offset}) or length ({length}).")
    if offset + length > file.size:
        raise _error(tensor, f"wants bytes {offset}..{offset + length} of '{location}', which has only "
                             f"{file.size}: the external data is truncated.")


def marker(file: CheckedFile) -> str:
    """The lazy location standing for `file` (same token for the same file)."""
    key = (file.device, file.inode, file.path)
    token = _TOKENS.get(key)
    if token is None:
        token = secrets.token_hex(8)
        _TOKENS[key] = token
        _CHECKED[token] = file
    return f"{MARKER_PREFIX}{token}{MARKER_NOTE}"


def is_marker(location: str) -> bool:
    return location.startswith(MARKER_PREFIX)


def resolve_marker(location: str, tensor: str) -> CheckedFile:
    token = location[len(MARKER_PREFIX):].split(" ", 1)[0].split("/", 1)[0]
    file = _CHECKED.get(token)
    if file is None:
        raise _error(tensor, f"refers to weights onnxopt kept on disk in another process ({location.split(' ')[0]}): "
                             "write the model with onnxopt.save in the process that optimized it.")
    return file


def entries_info(entries: Iterable[Tuple[str, str]], tensor: str) -> Tuple[str, int, Optional[int]]:
    """(location, offset, length or None) of external-data entries, numbers checked like onnx does."""
    info = dict(entries)
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") not in (None, "") else None
    except ValueError:
        raise _error(tensor, f"has a non-integer external offset or length ({info.get('offset')!r}, "
                             f"{info.get('length')!r}).") from None
    return info.get("location", ""), offset, length


def open_checked(file: CheckedFile, tensor: str) -> BinaryIO:
    """`file` opened for reading without following links, refused if it is no longer the checked one."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(file.path, flags)
    except OSError as exc:
        raise _error(tensor, f"cannot open its external data {file.path}: {exc.strerror}.") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (file.device, file.inode) or st.st_nlink > 1 or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _error(tensor, f"external data {file.path} changed after it was checked (possible TOCTOU attack).")
    return os.fdopen(fd, "rb")


def read(file: CheckedFile, offset: int, length: int, tensor: str) -> bytes:
    with open_checked(file, tensor) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise _error(tensor, f"external data in {file.path} is truncated ({len(data)} of {length} bytes).")
    return data


def copy(file: CheckedFile, offset: int, length: int, out: BinaryIO, tensor: str) -> None:
    """Stream `length` bytes at `offset` of `file` into `out`, CHUNK bytes at a time."""
    with open_checked(file, tensor) as f:
        f.seek(offset)
        remaining = length
        while remaining:
            chunk = f.read(min(remaining, CHUNK))
            if not chunk:
                raise _error(tensor, f"external data in {file.path} is truncated.")
            out.write(chunk)
            remaining -= len(chunk)


def data_file_name(model_path: str) -> str:
    """The external-data file written beside `model_path`: its file name + ".data", never a path."""
    name = os.path.basename(model_path) + ".data"
    if name in (".data", "..data") or os.sep in name or (os.altsep and os.altsep in name):
        raise InvalidModelError(f"{model_path}: cannot derive an external-data file name from it")
    return name


def create_temp(folder: str) -> Tuple[int, str]:
    """(fd, path) of a new, empty file in `folder` for writing, created with O_EXCL (never an existing
    file or link) and mode 0666 so the kernel applies the umask: the finished file gets the mode a
    plain open() gives (0644 under umask 022), not mkstemp's 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(folder, f".onnxopt-{secrets.token_hex(8)}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")
