"""tools/mutants.py, the mutation sample run by hand before a release: its mutants change one line and compile,
its sample is the same for the same seed, and its map of core files to tests names files that exist."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
mutants = importlib.util.module_from_spec(_spec)
sys.modules["mutants"] = mutants  # dataclasses look their module up there
_spec.loader.exec_module(mutants)

SOURCE = '''"""A module docstring."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os

__all__ = ["f"]


def f(x, items):
    """Say what f does."""
    total = 0
    for item in items:
        if item == x and item is not None:
            total += 1
        elif item not in items:
            break
    label = "×××"  # non-ASCII before the end of a statement
    keep = True  # pragma: no mutate
    while total < 3:
        total = total + 1
    return total if not keep else -total
    if label == "××": label = None
    try:
        pass
    except OSError:  # pragma: no cover
        total = 1
'''


def test_each_mutant_changes_one_line_and_compiles():
    found = mutants.mutants_of(SOURCE, "m.py")
    original = SOURCE.splitlines()
    assert len(found) > 15
    for m in found:
        mutated = mutants.apply(SOURCE, m).splitlines()
        assert len(mutated) == len(original)
        assert [i for i, (a, b) in enumerate(zip(original, mutated, strict=True), 1) if a != b] == [m.line], m
        ast.parse(mutants.apply(SOURCE, m))  # every operator here yields valid Python


def test_the_operators_expected_are_there():
    found = {(m.line, m.operator, m.mutated.strip()) for m in mutants.mutants_of(SOURCE, "m.py")}
    assert (14, "== -> !=", "if item != x and item is not None:") in found
    assert (14, "and -> or", "if item == x or item is not None:") in found
    assert (14, "is not -> is", "if item == x and item is None:") in found
    assert (15, "+= -> -=", "total -= 1") in found
    assert (16, "not in -> in", "elif item in items:") in found
    assert (17, "break -> continue", "continue") in found
    assert (18, "statement -> pass", "pass") in found  # the line's non-ASCII text does not shift the columns
    assert (20, "< -> <=", "while total <= 3:") in found
    assert (20, "while c -> while not c", "while not (total < 3):") in found
    assert (12, "0 -> 1", "total = 0") not in found and (12, "0 -> 1", "total = 1") in found
    assert (22, "return x -> return None", "return None") in found
    assert (22, "not x -> x", "return total if keep else -total") in found
    assert (23, "if c -> if not c", 'if not (label == "××"): label = None') in found  # columns in bytes


def test_docstrings_type_checking_blocks_all_and_marked_lines_are_left_alone():
    lines = {m.line for m in mutants.mutants_of(SOURCE, "m.py")}
    assert not lines & {1, 4, 5, 7, 11, 19}
    assert not lines & {26, 27}  # a block coverage leaves out (`pragma: no cover`)


def test_the_sample_is_seeded(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(SOURCE)
    first, lines = mutants.sample(tmp_path, ["*.py"], 5, seed=7)
    again, _ = mutants.sample(tmp_path, ["*.py"], 5, seed=7)
    assert first == again and len(first) == 5 and lines > 5
    assert len({(m.path, m.line) for m in first}) == 5  # five different lines


def test_the_map_names_existing_tests_and_every_core_glob_matches_a_file():
    for tests in [*mutants.TESTS.values(), mutants.DEFAULT_TESTS]:
        for name in tests:
            assert (ROOT / "tests" / f"{name}.py").is_file(), name
    for pattern in mutants.CORE:
        assert list(ROOT.glob(pattern)), pattern
    for pattern in mutants.CORE:
        for path in ROOT.glob(pattern):
            assert mutants.tests_for(ROOT, path.relative_to(ROOT).as_posix())


def test_a_survivor_killed_by_the_whole_suite_is_reported_as_outside_the_map():
    class WholeSuite:
        def test(self, mutant, tests):
            assert tests == ["tests"]
            return mutants.Outcome(mutant, "killed", 1.0, "FAILED tests/test_x.py::test_y")

    m = mutants.mutants_of(SOURCE, "m.py")[0]
    again = mutants._recheck(WholeSuite(), mutants.Outcome(m, "survived"))
    assert (again.status, again.detail) == ("killed", "outside the map: FAILED tests/test_x.py::test_y")
    killed = mutants.Outcome(m, "killed", 2.0, "FAILED tests/test_a.py::test_b")
    assert mutants._recheck(WholeSuite(), killed) is killed
