"""Seeded mutators over serialized models and calibration data.

`make_case(seed, index, root)` is a pure function of (seed, index) apart from the absolute paths
under `root` it may write into the model: the same pair always gives the same mutations, so any
failure is replayed with `benchmarks/fuzz.py --seed S --only INDEX`.

A plain seeded mutator, not hypothesis: the inputs are protobuf messages plus a folder of files
(symlinks, hard links, an outside sentinel), the interesting mutations are structural and few per
case, and a failing case must replay bit for bit in a subprocess worker that may be killed by a crash;
hypothesis' shrinking would need its own process isolation to survive segfaults and adds a dependency
for no gain here. Each mutation is described in words (`Case.mutations`), which is what the findings
notes quote.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple, Union

import numpy as np

from . import seeds
from .calibration_mutators import c_arrays, c_feeds, c_file, feeds_from_arrays, npz_bytes
from .context import Context, FileSpec
from .external_mutators import EXTERNAL_HOW
from .model_mutators import MODEL_MUTATORS, MODEL_WEIGHTS, mutate_bytes

MODES = ("api", "api-int8", "cli-optimize", "cli-int8", "cli-inspect")
MODE_WEIGHTS = (0.3, 0.15, 0.3, 0.15, 0.1)


@dataclasses.dataclass
class Case:
    index: Union[int, str]
    seed_name: str
    mode: str
    mutations: List[str]
    model_bytes: bytes
    files: Dict[str, FileSpec]
    calibration: object = None  # api-int8: list of feed dicts; cli-int8: npz bytes or FileSpec
    cli_extra: List[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:  # index: an int (random case) or "tN" (targeted case)
        mode = self.mode + (" --no-autotune" if "--no-autotune" in self.cli_extra else "")
        return f"case {self.index} [{self.seed_name}/{mode}]: " + "; ".join(self.mutations or ["(no mutation)"])


def make_case(seed: int, index: int, root: str) -> Case:
    rng = np.random.default_rng([seed, index])
    files: Dict[str, FileSpec] = {}
    ctx = Context(rng, root, files)
    seed_name = ctx.choice(sorted(seeds.SEEDS))
    model, seed_files = seeds.SEEDS[seed_name](np.random.default_rng([seed, index, 1]))
    files.update(seed_files)
    arrays = seeds.calibration_arrays(model, np.random.default_rng([seed, index, 2]))  # from the unmutated seed
    mode = str(rng.choice(MODES, p=MODE_WEIGHTS))
    if seed_name == "if" and mode == "cli-int8":  # a scalar input cannot be cut into npz batches
        mode = "api-int8"
    mutations = []
    names = sorted(MODEL_MUTATORS)
    weights = np.array([MODEL_WEIGHTS[n] for n in names])
    count = int(rng.choice([0, 1, 1, 1, 2, 2, 3])) if mode.endswith("int8") else int(rng.choice([1, 1, 1, 2, 2, 3]))
    for _ in range(count):
        name = str(rng.choice(names, p=weights / weights.sum()))
        try:
            desc = MODEL_MUTATORS[name](model, ctx)
        except (ValueError, IndexError, TypeError):  # an earlier mutation left nothing it can work on
            desc = None
        if desc:
            mutations.append(desc)
    data = model.SerializeToString()
    for marker, replacement in ctx.byte_swaps:
        data = data.replace(marker, replacement)
    if rng.random() < 0.08:
        data, desc = mutate_bytes(data, ctx)
        mutations.append(desc)
    case = Case(index, seed_name, mode, mutations, data, files)
    if mode.endswith("int8"):
        calibration_mutated = not mutations or rng.random() < 0.4
        if calibration_mutated:
            mutations.append(c_arrays(arrays, ctx))
        if mode == "api-int8":
            case.calibration = feeds_from_arrays(arrays, rng)
            if rng.random() < 0.1:
                case.calibration, desc = c_feeds(case.calibration, ctx)
                mutations.append(desc)
        else:
            case.calibration = npz_bytes(arrays)
            if rng.random() < 0.15:
                case.calibration, desc = c_file(case.calibration, ctx)
                mutations.append(desc)
        if rng.random() < 0.5:  # the CLI's flag; the API run gets the same preset with autotune=False
            case.cli_extra.append("--no-autotune")
    return case


# A targeted case applies one chosen variant to a chosen seed and mode: every external-data attack
# on both the API and the CLI, whatever the random draw, so the short CI run always holds them.
# Control cases (no mutation: every seed in every mode) must come out valid: they keep the oracle honest.
TARGETED = [("external", mode, "external", how) for how in EXTERNAL_HOW for mode in ("api", "cli-optimize")] + \
    [("conv", "cli-int8", "external", how) for how in ("dotdot", "symlink", "hardlink", "absolute")] + \
    [(name, mode, None, None) for name in sorted(seeds.SEEDS) for mode in MODES
     if not (name == "if" and mode == "cli-int8")]


def make_targeted_case(k: int, root: str) -> Case:
    seed_name, mode, mutator, how = TARGETED[k]
    rng = np.random.default_rng([7, k])
    files: Dict[str, FileSpec] = {}
    ctx = Context(rng, root, files, how=how)
    model, seed_files = seeds.SEEDS[seed_name](np.random.default_rng([7, k, 1]))
    files.update(seed_files)
    arrays = seeds.calibration_arrays(model, np.random.default_rng([7, k, 2]))
    mutations = [MODEL_MUTATORS[mutator](model, ctx)] if mutator else []
    data = model.SerializeToString()
    for marker, replacement in ctx.byte_swaps:
        data = data.replace(marker, replacement)
    case = Case(f"t{k}", seed_name, mode, mutations, data, files)
    if mode == "cli-int8":  # without the cost guard, so the written model holds the com.onnxopt int8 ops
        case.calibration = npz_bytes(arrays)
        case.cli_extra.append("--no-autotune")
    elif mode == "api-int8":
        case.calibration = feeds_from_arrays(arrays, rng)
        case.cli_extra.append("--no-autotune")
    return case


def build_case(seed: int, index: Union[int, str], root: str) -> Case:
    """Random case `index` of `seed`, or targeted case "tK"."""
    if isinstance(index, str) and index.startswith("t"):
        return make_targeted_case(int(index[1:]), root)
    return make_case(seed, int(index), root)
