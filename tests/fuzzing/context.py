"""What every mutator shares: the sentinel file's name and bytes, and the mutation context."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

SENTINEL_NAME = "secret.bin"  # beside the model's folder (../secret.bin): onnxopt must never read it
SENTINEL_TOKEN = b"<<onnxopt-fuzz-sentinel>>"
SENTINEL_BYTES = SENTINEL_TOKEN * 400  # ~10 KB: any tensor read from it carries the token

# A file of the model's folder, keyed by its name (str, or bytes for a non-UTF-8 name): its bytes,
# or ("symlink", target) | ("hardlink", target) | ("dir", "") to create.
FileSpec = Union[bytes, Tuple[str, str]]


class Context:
    """What a mutator needs besides the model: the rng, the case folder and the files/bytes edits."""

    def __init__(self, rng: np.random.Generator, root: str, files: Dict[str, FileSpec], how: Optional[str] = None):
        self.rng, self.root, self.files, self.forced_how = rng, root, files, how
        self.byte_swaps: List[Tuple[bytes, bytes]] = []  # (marker, replacement) applied after serializing
        self.markers = 0

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def how(self, options):
        """The variant a mutator applies: random, or the one a targeted case asks for."""
        return self.forced_how if self.forced_how in options else self.choice(options)

    def non_utf8(self, base: str) -> str:
        """A same-length marker name that becomes invalid UTF-8 in the serialized bytes."""
        self.markers += 1
        marker = f"Q{self.markers}{''.join(c for c in base if c.isalnum())[:8]}Z"
        self.byte_swaps.append((marker.encode(), b"\xff" + marker.encode()[1:-1] + b"\xc3"))
        return marker

    @property
    def model_dir(self):
        return os.path.join(self.root, "model")
