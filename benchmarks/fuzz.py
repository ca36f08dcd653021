"""Long mutation-fuzz run over onnxopt's API and CLI (issue 16).

    python benchmarks/fuzz.py [--cases 5000] [--seed 0] [--budget 1800] [--start 0] [--only I,J]
                              [--timeout 120] [--keep] [--log failures.txt]

Each case is a small seed model (Conv/MatMul/Add/Relu graphs, one with external data, one with an If
body) with a few seeded mutations (protobuf fields, dims, dtypes, names incl. non-UTF-8 bytes,
raw_data lengths, external-data locations/offsets/lengths, symlinks and hard links, opsets; and the
calibration .npz or feeds for the int8 runs), run as users run onnxopt: `onnxopt.optimize` with the
default passes or the int8 preset, `onnxopt optimize IN -o OUT` or `onnxopt inspect`. Every case must
end as a clean onnxopt error or a valid model (passes onnx.checker, runs in onnxruntime, matches the
input's outputs), without reading outside the model's folder. Case `I` of seed `S` is always the same
case: replay one with `--seed S --only I --keep` (its folder is kept and printed). The targeted cases
t0.. (every external-data attack against the API and the CLI) run first unless --no-targeted.

Prints a progress line every few seconds, every failing case as it happens, a table of failure classes
(count, first case) and a final summary line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.fuzzing import harness, mutate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=5000, help="number of cases (default 5000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--only", help="comma-separated case indices to run (replay); tK is targeted case K")
    ap.add_argument("--no-targeted", action="store_true",
                    help="skip the targeted cases (every external-data attack on the API and the CLI) run first")
    ap.add_argument("--budget", type=float, help="stop starting new cases after this many seconds")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--keep", action="store_true", help="keep the folders of failing cases")
    ap.add_argument("--log", help="write every failing case (mutations and verdict) to this file")
    ap.add_argument("--quiet", action="store_true", help="no line per failing case")
    args = ap.parse_args(argv)

    if args.only:
        indices = [i if i.startswith("t") else int(i) for i in args.only.split(",")]
    else:
        targeted = [] if args.no_targeted else [f"t{k}" for k in range(len(mutate.TARGETED))]
        indices = targeted + list(range(args.start, args.start + args.cases))
    total = len(indices)
    log = open(args.log, "w") if args.log else None
    start = time.monotonic()
    last = [start]

    def progress(fuzzer, verdict):
        done = fuzzer.counts["cases"]
        if verdict.failed:
            text = verdict.line()
            if log:
                log.write(text + "\n")
                log.flush()
            if not args.quiet:
                print(text, flush=True)
        now = time.monotonic()
        if now - last[0] > 5 or done == total:
            last[0] = now
            failed = sum(fuzzer.class_counts.values())
            print(f"[{done}/{total}] {now - start:.0f} s, {done / (now - start):.1f} cases/s, {failed} failing",
                  file=sys.stderr, flush=True)

    fuzzer = harness.run(args.seed, indices, timeout=args.timeout, keep=args.keep, budget=args.budget,
                         progress=progress)
    if log:
        log.close()
    print()
    print(f"{'count':>6}  failure class  (first case)")
    for key, n in fuzzer.class_counts.most_common():
        first = fuzzer.classes[key][0]
        print(f"{n:>6}  {key}  (case {first.case.index})")
    if args.keep:
        print(f"\nfailing cases kept under {fuzzer.workdir}")
    print()
    print(f"seed {args.seed}, {time.monotonic() - start:.0f} s")
    print(fuzzer.summary())
    return 1 if fuzzer.class_counts else 0


if __name__ == "__main__":
    sys.exit(main())
