"""passes.md and the registry agree: every built-in pass documented once, with its real kind and
exactness, and nothing documented that is not registered."""
import os
import re

import onnxopt
from onnxopt.passes import base, builtin

DOC = os.path.join(os.path.dirname(__file__), "..", "passes.md")


def _documented():
    text = open(DOC, encoding="utf-8").read()
    section = text.split("\n## Passes\n", 1)[1].split("\n## ", 1)[0]
    entries = {}
    for m in re.finditer(r"^### (\S+)\n- kind: (\w+) \| exact: (yes|no) \| idempotent: (yes|no)", section, re.M):
        assert m.group(1) not in entries, f"{m.group(1)} documented twice"
        entries[m.group(1)] = (m.group(2), m.group(3) == "yes", m.group(4) == "yes")
    return entries, section


def test_every_builtin_pass_is_documented_and_nothing_else():
    documented, _ = _documented()
    assert set(documented) == set(builtin.BUILTIN), (
        f"undocumented: {sorted(set(builtin.BUILTIN) - set(documented))}; "
        f"documented but not registered: {sorted(set(documented) - set(builtin.BUILTIN))}")


def test_documented_kind_and_exactness_match_the_pass():
    documented, _ = _documented()
    for name, (kind, exact, idempotent) in documented.items():
        p = onnxopt.get_pass(name)
        assert (p.kind, p.exact, p.idempotent) == (kind, exact, idempotent), name


def test_presets_are_documented():
    text = open(DOC, encoding="utf-8").read()
    for preset, members in base.list_presets().items():
        m = re.search(rf"^- `{preset}`: (.*)$", text, re.M)
        assert m, f"preset {preset} not documented"
        names = re.sub(r"\s*\(.*\)\s*$", "", m.group(1))  # a trailing "(with options...)" is commentary
        assert [s.strip("` ") for s in names.split(",") if s.strip()] == members, preset
