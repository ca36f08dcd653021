#!/usr/bin/env python3
"""Count what the compiler made of the int8 hot loops in a built library.

    tools/check_codegen.py [--verbose] [--json] LIB.so [LIB.so ...]

Runs `objdump -d` on each library, finds every loop (a backward branch) that contains an integer
dot-product instruction (vpdpbusd, or vpmaddwd / vpmaddubsw for the AVX2 path) and no inner loop
that does, and counts per iteration (dot-free inner loops, e.g. an output stage, left out):

  dots    the dot-product instructions (the work),
  moves   vector register-to-register moves (vmovdqa*/vmovdqu*/vmovaps/vmovups between registers:
          an accumulator copied into a scratch register and back; Zen 4 does not eliminate them),
  stack   vector loads/stores addressed off %rsp/%rbp (accumulators spilled inside the loop).

A loop fails when it stores to the stack or has more than --max-move-ratio moves per dot product. Exit
status 1 when any loop fails (or none is found), so CI and tests/test_codegen.py keep the code form
that GCC 12 and clang both compile to one dot product per accumulator update without spills.
"""

import argparse
import bisect
import json
import re
import shutil
import subprocess
import sys

DOTS = ("vpdpbusd", "vpdpbusds", "vpmaddwd", "vpmaddubsw")
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_VREG = re.compile(r"^%[xyz]mm\d+$")
_JUMP_TARGET = re.compile(r"^([0-9a-f]+)(?:\s|$)")


def _objdump(path):
    tool = shutil.which("objdump")
    if tool is None:
        raise FileNotFoundError("objdump not found")
    out = subprocess.run([tool, "-d", "-C", "--no-show-raw-insn", "-M", "att", path], check=True,
                         capture_output=True, text=True).stdout
    return parse_objdump(out)


def parse_objdump(text):
    """objdump -d --no-show-raw-insn text -> {function: [(address, mnemonic, operands)]}."""
    funcs, name = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            name = m.group(1)
            funcs[name] = []
            continue
        m = _INSN.match(line)
        if m and name is not None:
            funcs[name].append((int(m.group(1), 16), m.group(2), m.group(3).split("#")[0].strip()))
    return funcs


def _operands(ops):
    # split on commas outside parentheses: "0x40(%rax,%rcx,1),%zmm1" -> two operands
    parts, depth, cur = [], 0, ""
    for ch in ops:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _is_vmove(mn, ops):
    if not mn.startswith(("vmovdq", "vmovap", "vmovup")):
        return False
    parts = _operands(ops)
    return len(parts) == 2 and all(_VREG.match(p) for p in parts)


def _zmm_name(reg):
    return reg.split("{")[0].replace("%xmm", "%zmm").replace("%ymm", "%zmm")


def _written(mn, ops):
    """The vector register an instruction writes (AT&T: the last operand), or None."""
    parts = _operands(ops)
    if parts and _VREG.match(parts[-1].split("{")[0]):
        return _zmm_name(parts[-1])
    return None


def _stack_access(mn, ops):
    """'store' / 'load' for a vector access addressed off %rsp or %rbp, else None."""
    if not ("%zmm" in ops or "%ymm" in ops) or not ("(%rsp" in ops or "(%rbp" in ops):
        return None
    parts = _operands(ops)
    return "store" if parts and "(%r" in parts[-1] else "load"


def _reachable(insns, addrs, lo, hi):
    """Which instructions of [lo, hi] the loop header reaches without leaving the range: code the
    compiler placed between header and back branch but reached only from elsewhere is not the loop."""
    live = [False] * (hi - lo + 1)
    todo = [lo]
    while todo:
        k = todo.pop()
        while lo <= k <= hi and not live[k - lo]:
            live[k - lo] = True
            mn, ops = insns[k][1], insns[k][2]
            if mn.startswith("j"):
                m = _JUMP_TARGET.match(ops)
                if m:
                    todo.append(bisect.bisect_left(addrs, int(m.group(1), 16)))
                if mn == "jmp":
                    break
            elif mn.startswith("ret"):
                break
            k += 1
    return live


def loops(funcs):
    """Loops holding dot products (none in an inner loop): dicts with function, start, end, counts."""
    found = []
    for fname, insns in funcs.items():
        if not any(mn in DOTS for _, mn, _ in insns):
            continue
        addrs = [a for a, _, _ in insns]
        backs = []
        for addr, mn, ops in insns:
            if mn.startswith("j"):
                m = _JUMP_TARGET.match(ops)
                if m and int(m.group(1), 16) <= addr:
                    backs.append((bisect.bisect_left(addrs, int(m.group(1), 16)), bisect.bisect_left(addrs, addr)))
        for lo, hi in backs:
            inner = [(l2, h2) for l2, h2 in backs if lo <= l2 and h2 < hi]
            nested = [False] * (hi - lo + 1)
            for l2, h2 in inner:
                for k in range(l2, h2 + 1):
                    nested[k - lo] = True
            if any(nested[k - lo] and insns[k][1] in DOTS for k in range(lo, hi + 1)):
                continue  # an inner loop does the dot products: that one is judged
            # the loop's own instructions; dot-free inner loops (an output stage) are not the hot path
            live = _reachable(insns, addrs, lo, hi)
            body = [insns[k] for k in range(lo, hi + 1) if live[k - lo] and not nested[k - lo]]
            dots = sum(1 for _, mn, _ in body if mn in DOTS)
            if not dots:
                continue
            # a copy of a value the loop itself produced (an accumulator moved to a scratch register
            # and back) costs an instruction per update; a copy of a loop-invariant register (a zero
            # to start the next tile's accumulator) does not repeat per update and is not counted
            written = {_written(mn, ops) for _, mn, ops in body} - {None}
            moves = sum(1 for _, mn, ops in body
                        if _is_vmove(mn, ops) and _zmm_name(_operands(ops)[0]) in written)
            spills = sum(1 for _, mn, ops in body if _stack_access(mn, ops) == "store")
            reloads = sum(1 for _, mn, ops in body if _stack_access(mn, ops) == "load")
            found.append({"function": fname if "@@" not in fname else "?", "start": hex(insns[lo][0]),
                          "end": hex(insns[hi][0]), "insns": len(body), "dots": dots, "moves": moves,
                          "spills": spills, "reloads": reloads})
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--max-move-ratio", type=float, default=0.25,
                    help="loop-carried moves per dot product allowed in a loop (default 0.25: a depthwise "
                         "row loop may keep one copy; the broken GEMM tiles had 2)")
    ap.add_argument("--min-dots", type=int, default=1,
                    help="loops with fewer dot products are reported but not judged")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    rows, bad = [], 0
    for lib in args.libs:
        for lp in loops(_objdump(lib)):
            lp["lib"] = lib
            judged = lp["dots"] >= args.min_dots
            lp["ok"] = (not judged) or (lp["spills"] == 0 and lp["moves"] <= args.max_move_ratio * lp["dots"])
            bad += not lp["ok"]
            rows.append(lp)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for lp in rows:
            if args.verbose or not lp["ok"]:
                print(f"{'ok  ' if lp['ok'] else 'FAIL'} dots={lp['dots']:3d} moves={lp['moves']:3d} "
                      f"spills={lp['spills']:3d} reloads={lp['reloads']:3d} insns={lp['insns']:4d} {lp['start']}  {lp['function'][:110]}")
        judged = [r for r in rows if r["dots"] >= args.min_dots]
        print(f"{len(rows)} dot-product loops ({len(judged)} with >= {args.min_dots} dots): {bad} failing; "
              f"totals dots={sum(r['dots'] for r in judged)} moves={sum(r['moves'] for r in judged)} "
              f"spills={sum(r['spills'] for r in judged)} reloads={sum(r['reloads'] for r in judged)}")
    if not rows:
        print("no dot-product loop found", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
