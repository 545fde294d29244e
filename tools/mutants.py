"""A mutation sample of hookkit's core: do the tests notice when one line of the code is wrong?

    python tools/mutants.py --count 30 --seed 1            # 30 random single-line mutants, one at a time
    python tools/mutants.py --count 30 --seed 1 --jobs 2   # two at a time (two copies of the repository)
    python tools/mutants.py --count 30 --list              # show the sample, run nothing

Each mutant changes one line of one core file (``==`` -> ``!=``, ``and`` -> ``or``, ``True`` -> ``False``, a whole
number plus or minus one, a statement replaced by ``pass``, ``return x`` -> ``return None``, an ``if`` negated, ...).
It is applied in a temporary copy of the repository, never in the working tree, and the test files mapped to that
file (``TESTS`` below), plus the file's own doctests, run with ``pytest -x`` under a timeout. Each mutant is then:

- killed: a test failed (or could not even import the mutated code);
- survived: every test passed. Either the mutant is equivalent (it cannot change behaviour: judge by reading the
  two lines printed) or the changed behaviour is untested: write the test that kills it;
- timed out: the tests ran longer than ``--timeout-factor`` x their time on the unchanged code;
- not compiled: the mutated file is not valid Python (no tests ran).

The mapped tests first run once on the unchanged copy: that gives the timeout and makes sure a kill is the mutant's
doing. Run it by hand before a release (it takes minutes per mutant on a small machine), not in CI.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import fnmatch
import io
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The core, as globs (files split or renamed inside these folders are picked up without a change here).
CORE = [
    "hookkit/core/*.py",
    "hookkit/record/saved*.py",
    "hookkit/monitoring/*.py",
    "hookkit/intervene/edits*.py",
    "hookkit/extraction/rowstore*.py",
    "hookkit/extraction/extract*.py",
]

# Which test files exercise a core file: glob of the file -> test files. A file that matches no glob gets the test
# files that name its module (hookkit.core.engine, or `engine` imported from hookkit.core), else DEFAULT_TESTS.
TESTS: dict[str, list[str]] = {
    "hookkit/core/engine*.py": ["test_capture_values", "test_capture_grads", "test_param_grads", "test_checkpointing",
                                "test_hooks_come_off", "test_trace", "test_engine"],
    "hookkit/core/calls*.py": ["test_capture_values", "test_capture_grads", "test_saved", "test_engine"],
    "hookkit/core/gradtaps*.py": ["test_capture_grads", "test_param_grads", "test_trace", "test_engine"],
    "hookkit/core/fastpath*.py": ["test_capture_values", "test_copy_on_write", "test_engine"],
    "hookkit/core/listener*.py": ["test_engine", "test_trace"],
    "hookkit/core/checkpointing*.py": ["test_checkpointing", "test_engine"],
    "hookkit/core/opnames*.py": ["test_op_nodes", "test_op_nodes_fx", "test_wrapped_torch", "test_copy_on_write"],
    "hookkit/core/snapshot*.py": ["test_capture_values", "test_copy_on_write", "test_hostile_core"],
    "hookkit/core/ops*.py": ["test_op_nodes", "test_op_nodes_fx", "test_copy_on_write", "test_wrapped_torch"],
    "hookkit/core/select*.py": ["test_arguments", "test_errors", "test_capture_values", "test_op_nodes"],
    "hookkit/core/tree*.py": ["test_tree", "test_capture_values", "test_hf_outputs"],
    "hookkit/core/handles*.py": ["test_hooks_come_off", "test_hooks", "test_structure"],
    "hookkit/core/census*.py": ["test_hooks_come_off", "test_capture_values"],
    "hookkit/core/compat*.py": ["test_wrapped_torch", "test_wrappers", "test_checkpointing"],
    "hookkit/core/state*.py": ["test_summary", "test_hostile_core"],
    "hookkit/core/check*.py": ["test_arguments", "test_errors"],
    "hookkit/core/fs*.py": ["test_file_modes", "test_saved", "test_extract_crash"],
    "hookkit/core/stats*.py": ["test_summary", "test_trace", "test_monitor"],
    "hookkit/record/saved*.py": ["test_saved", "test_saved_untrusted"],
    "hookkit/record/[a-z]*code*.py": ["test_saved", "test_saved_untrusted", "test_saved_enums"],
    "hookkit/record/merge*.py": ["test_saved", "test_saved_enums", "test_capture_result"],
    "hookkit/record/join*.py": ["test_saved", "test_capture_result"],
    "hookkit/record/recording*.py": ["test_capture_values", "test_capture_result", "test_saved"],
    "hookkit/monitoring/monitor*.py": ["test_monitor", "test_monitor_ranks", "test_monitor_distributed"],
    "hookkit/monitoring/collect*.py": ["test_monitor", "test_monitor_ranks", "test_monitor_distributed"],
    "hookkit/monitoring/ranks*.py": ["test_monitor_distributed", "test_monitor_ranks", "test_monitor"],
    "hookkit/monitoring/records*.py": ["test_monitor_sinks", "test_monitor_plot", "test_monitor"],
    "hookkit/monitoring/sinks*.py": ["test_monitor_sinks", "test_file_modes"],
    "hookkit/monitoring/plot*.py": ["test_monitor_plot"],
    "hookkit/intervene/edits*.py": ["test_edits", "test_checkpointing", "test_interventions"],
    "hookkit/intervene/target*.py": ["test_edits", "test_interventions"],
    "hookkit/extraction/rowstore*.py": ["test_extract", "test_extract_tokens", "test_extract_crash",
                                        "test_extract_shards"],
    "hookkit/extraction/npyfolder*.py": ["test_extract", "test_extract_tokens", "test_extract_crash",
                                         "test_extract_shards"],
    "hookkit/extraction/manifest*.py": ["test_extract", "test_extract_crash", "test_extract_shards"],
    "hookkit/extraction/options*.py": ["test_extract", "test_extract_hostile", "test_cli_extract"],
    "hookkit/extraction/rows*.py": ["test_extract", "test_extract_tokens"],
    "hookkit/extraction/extract*.py": ["test_extract", "test_extract_hostile", "test_extract_tokens",
                                       "test_extract_shards"],
}
DEFAULT_TESTS = ["test_capture_values", "test_hooks_come_off"]

# One token swapped for another: the classic operators of mutation testing.
SWAPS = {"==": "!=", "!=": "==", "<": "<=", "<=": "<", ">": ">=", ">=": ">", "+": "-", "-": "+", "+=": "-=",
         "-=": "+=", "and": "or", "or": "and", "True": "False", "False": "True", "break": "continue",
         "continue": "break"}
# Statements that "replace by pass" would only turn into an ImportError or a no-op: not worth a mutant.
_NOT_DELETED = (ast.Import, ast.ImportFrom, ast.Pass, ast.Global, ast.Nonlocal)


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to the repository, posix
    line: int  # 1-based
    operator: str
    original: str
    mutated: str

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, timed out, not compiled, baseline failed, error
    seconds: float = 0.0
    detail: str = ""


def _token_mutants(source: str) -> list[tuple[int, str, int, int, str]]:
    """(line, operator, start column, end column, replacement) for each token that one swap changes."""
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        (row, col), (end_row, end_col) = tok.start, tok.end
        if row != end_row or tok.type not in (tokenize.OP, tokenize.NAME, tokenize.NUMBER):
            continue
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        prev = tokens[i - 1].string if i else ""
        if tok.string in SWAPS:
            found.append((row, f"{tok.string} -> {SWAPS[tok.string]}", col, end_col, SWAPS[tok.string]))
        elif tok.string == "is":
            if nxt == "not":  # `is not` -> `is`
                found.append((row, "is not -> is", col, tokens[i + 1].end[1], "is"))
            else:
                found.append((row, "is -> is not", col, end_col, "is not"))
        elif tok.string == "in" and prev == "not":
            found.append((row, "not in -> in", tokens[i - 1].start[1], end_col, "in"))
        elif tok.string == "not" and nxt != "in" and prev != "is":
            found.append((row, "not x -> x", col, tokens[i + 1].start[1], ""))
        elif tok.type == tokenize.NUMBER and re.fullmatch(r"[0-9]+", tok.string):
            n = int(tok.string)
            found.append((row, f"{n} -> {n + 1}", col, end_col, str(n + 1)))
            if n > 0:
                found.append((row, f"{n} -> {n - 1}", col, end_col, str(n - 1)))
    return found


def _statement_mutants(tree: ast.AST, lines: list[str]) -> list[tuple[int, str, str]]:
    """(line, operator, new line) for one-line statements: replaced by pass, `return None`, an `if` negated."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt) or node.lineno != node.end_lineno:
            continue
        line = lines[node.lineno - 1]
        indent = line[: len(line) - len(line.lstrip())]
        rest = line.encode()[node.end_col_offset:].decode().strip()  # ast's columns count UTF-8 bytes
        alone = node.col_offset == len(indent.encode()) and (not rest or rest.startswith("#"))
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if alone and not docstring and not isinstance(node, _NOT_DELETED):
            found.append((node.lineno, "statement -> pass", f"{indent}pass\n"))
        if alone and isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            found.append((node.lineno, "return x -> return None", f"{indent}return None\n"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.While) and node.test.lineno == node.test.end_lineno == node.lineno:
            raw = lines[node.lineno - 1].encode()
            start, end = node.test.col_offset, node.test.end_col_offset
            negated = (raw[:start] + b"not (" + raw[start:end] + b")" + raw[end:]).decode()
            found.append((node.lineno, f"{type(node).__name__.lower()} c -> {type(node).__name__.lower()} not c",
                          negated))
    return found


def _skipped_lines(tree: ast.AST, lines: list[str]) -> set[int]:
    """Lines no mutant touches: `if TYPE_CHECKING:` blocks, `__all__`, lines marked `# pragma: no mutate`, and what
    coverage is told to leave out (`# pragma: no cover` on a line, or on the first line of a block: the whole block),
    which no test is meant to reach."""
    skipped = {i for i, text in enumerate(lines, 1) if "pragma: no mutate" in text or "pragma: no cover" in text}
    for node in ast.walk(tree):
        first = getattr(node, "lineno", None)
        if first and "pragma: no cover" in lines[first - 1]:
            skipped.update(range(first, (getattr(node, "end_lineno", None) or first) + 1))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return skipped


def mutants_of(source: str, path: str = "<source>") -> list[Mutant]:
    """Every single-line mutant of one file's source, in line order."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    skipped = _skipped_lines(tree, lines)
    found: dict[tuple[int, str], Mutant] = {}  # one mutant per distinct mutated line
    for row, operator, start, end, new in _token_mutants(source):
        if row not in skipped:
            line = lines[row - 1]
            found.setdefault((row, line[:start] + new + line[end:]), Mutant(path, row, operator, line,
                                                                           line[:start] + new + line[end:]))
    for row, operator, new_line in _statement_mutants(tree, lines):
        if row not in skipped:
            found.setdefault((row, new_line), Mutant(path, row, operator, lines[row - 1], new_line))
    return sorted((m for m in found.values() if m.mutated != m.original),
                  key=lambda m: (m.line, m.operator, m.mutated))


def apply(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    assert lines[mutant.line - 1] == mutant.original, f"{mutant.where()} changed since it was sampled"
    lines[mutant.line - 1] = mutant.mutated
    return "".join(lines)


def compiles(source: str, path: str = "<mutant>") -> bool:
    try:
        compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def sample(root: Path, globs: list[str], count: int, seed: int) -> tuple[list[Mutant], int]:
    """`count` mutants on as many different lines, chosen at random (seeded); also the number of lines eligible."""
    by_line: dict[tuple[str, int], list[Mutant]] = {}
    paths = sorted({p for g in globs for p in root.glob(g) if p.is_file()})
    for path in paths:
        rel = path.relative_to(root).as_posix()
        for m in mutants_of(path.read_text(), rel):
            by_line.setdefault((m.path, m.line), []).append(m)
    rng = random.Random(seed)
    keys = sorted(by_line)
    chosen = rng.sample(keys, min(count, len(keys)))
    return [rng.choice(by_line[k]) for k in chosen], len(keys)


def tests_for(root: Path, path: str) -> list[str]:
    """The test files to run against a mutant of `path` (relative, posix)."""
    names = sorted({t for pattern, tests in TESTS.items() if fnmatch.fnmatch(path, pattern) for t in tests})
    if not names:
        module = path.removesuffix(".py").replace("/", ".")
        package, _, stem = module.rpartition(".")
        pattern = re.compile(rf"\b{re.escape(module)}\b|from {re.escape(package)} import [^\n]*\b{stem}\b")
        names = sorted(p.stem for p in (root / "tests").glob("test_*.py") if pattern.search(p.read_text()))
    return [f"tests/{n}.py" for n in names or DEFAULT_TESTS]


def _copy_repository(root: Path, dest: Path) -> None:
    """The files git knows (tracked, or untracked and not ignored) copied to `dest`; without git, the tree minus
    caches and virtual environments."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.split("\0")):
            src = root / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        shutil.copytree(root, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist",
            "mutants"))


def _environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH", "")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no .pyc of a mutant outlives it (same size, same second)
    return env


def _run(cmd: list[str], copy: Path, timeout: float) -> tuple[int | None, float, str]:
    """Return code (None on timeout), seconds, output. A timeout kills the whole process group (torchrun ranks)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=_environment(copy), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, time.monotonic() - start, out
    return proc.returncode, time.monotonic() - start, out


def _pytest(python: str, tests: list[str], module: str) -> list[str]:
    # The mutated module's own doctests run too (--doctest-modules comes from pyproject's addopts).
    return [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests, module]


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:160]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


class Runner:
    """Copies of the repository (one per job) in which mutants are applied, tested and undone."""

    def __init__(self, root: Path, jobs: int, python: str, factor: float, minimum: float) -> None:
        self.root, self.python, self.factor, self.minimum = root, python, factor, minimum
        self.tmp = Path(tempfile.mkdtemp(prefix="hookkit-mutants-"))
        self.copies: queue.Queue[Path] = queue.Queue()
        for i in range(jobs):
            copy = self.tmp / f"copy{i}"
            _copy_repository(root, copy)
            self.copies.put(copy)
        self.baselines: dict[tuple[str, ...], tuple[bool, float, str]] = {}
        self.lock = threading.Lock()
        self.locks: dict[tuple[str, ...], threading.Lock] = {}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def check_import(self) -> str:
        """Where the copy's `import hookkit` resolves: it must be the copy, not an installed hookkit."""
        copy = self.copies.get()
        try:
            code, _, out = _run([self.python, "-c", "import hookkit; print(hookkit.__file__)"], copy, 300)
        finally:
            self.copies.put(copy)
        found = out.strip().splitlines()[-1] if out.strip() else ""
        if code != 0 or not Path(found).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy's `import hookkit` gives {found or out!r}, not the copy: check PYTHONPATH "
                             f"and the python given by --python")
        return found

    def baseline(self, tests: list[str], module: str) -> tuple[bool, float, str]:
        """The mapped tests on the unchanged code: do they pass, and how long do they take?"""
        key = (*tests, module)
        with self.lock:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:  # two jobs needing the same baseline: one runs it, the other waits for it
            if key not in self.baselines:
                copy = self.copies.get()
                try:
                    code, seconds, out = _run(_pytest(self.python, tests, module), copy, 3600)
                finally:
                    self.copies.put(copy)
                self.baselines[key] = (code == 0, seconds, _first_failure(out))
        return self.baselines[key]

    def test(self, mutant: Mutant, tests: list[str] | None = None) -> Outcome:
        tests = tests or tests_for(self.root, mutant.path)
        passed, seconds, failure = self.baseline(tests, mutant.path)
        if not passed:
            return Outcome(mutant, "baseline failed", seconds, failure)
        copy = self.copies.get()
        target = copy / mutant.path
        original = target.read_text()
        try:
            mutated = apply(original, mutant)
            if not compiles(mutated, mutant.path):
                return Outcome(mutant, "not compiled")
            target.write_text(mutated)
            timeout = max(self.minimum, self.factor * seconds)
            code, took, out = _run(_pytest(self.python, tests, mutant.path), copy, timeout)
        finally:
            target.write_text(original)
            self.copies.put(copy)
        if code is None:
            return Outcome(mutant, "timed out", took, f"over {timeout:.0f}s")
        status = {0: "survived", 1: "killed", 2: "killed", 3: "killed"}.get(code, "error")
        detail = _first_failure(out) if status != "survived" else ""
        return Outcome(mutant, status, took, f"pytest exit {code}: {detail}" if status == "error" else detail)


def _recheck(runner: Runner, outcome: Outcome) -> Outcome:
    """A survivor tested again by the whole suite: killed there, the map missed the test that kills it."""
    if outcome.status != "survived":
        return outcome
    again = runner.test(outcome.mutant, ["tests"])
    print(f"recheck {outcome.mutant.where()}: {again.status} by the whole suite {again.detail}".rstrip(), flush=True)
    if again.status == "killed":
        return Outcome(outcome.mutant, "killed", again.seconds, f"outside the map: {again.detail}")
    return outcome


ORDER = ["killed", "survived", "timed out", "not compiled", "baseline failed", "error"]


def report(outcomes: list[Outcome], root: Path = ROOT, out=sys.stdout) -> None:
    counts = {s: sum(o.status == s for o in outcomes) for s in ORDER}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ORDER[:4]), file=out)
    judged = counts["killed"] + counts["survived"] + counts["timed out"]
    if judged:
        print(f"killed (or timed out) {counts['killed'] + counts['timed out']} of {judged} that ran; each survivor "
              "is either equivalent (judge from the lines below) or behaviour no test checks", file=out)
    for o in outcomes:
        if o.status in ("survived", "timed out", "baseline failed", "error"):
            m = o.mutant
            print(f"\n{o.status.upper()}  {m.where()}  [{m.operator}]  {o.detail}".rstrip(), file=out)
            print(f"  - {m.original.rstrip()}", file=out)
            print(f"  + {m.mutated.rstrip()}", file=out)
            print(f"  tests: {' '.join(tests_for(root, m.path))}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30, help="mutants to sample (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sample (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once, one copy each (default 1)")
    parser.add_argument("--files", nargs="+", default=CORE, metavar="GLOB", help="files to mutate (default: the core)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="the python that runs pytest (default: this one)")
    parser.add_argument("--timeout-factor", type=float, default=3.0,
                        help="a mutant times out after this many times the unchanged tests' time (default 3)")
    parser.add_argument("--min-timeout", type=float, default=60.0, help="seconds, at least (default 60)")
    parser.add_argument("--list", action="store_true", help="print the sampled mutants and their tests; run nothing")
    parser.add_argument("--recheck", action="store_true",
                        help="run each survivor again against the whole of tests/: a kill there means a test file "
                             "is missing from TESTS (costs a run of the whole suite per survivor)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.jobs < 1:
        parser.error("--count and --jobs must be at least 1")
    root = args.root.resolve()
    mutants, lines = sample(root, args.files, args.count, args.seed)
    print(f"{len(mutants)} mutants (seed {args.seed}) on {lines} lines that can be mutated; jobs {args.jobs}")
    if args.list:
        for m in mutants:
            print(f"{m.where()}  [{m.operator}]  tests: {' '.join(tests_for(root, m.path))}")
            print(f"  - {m.original.rstrip()}\n  + {m.mutated.rstrip()}")
        return 0
    runner = Runner(root, args.jobs, args.python, args.timeout_factor, args.min_timeout)
    try:
        print(f"import hookkit -> {runner.check_import()}", flush=True)
        outcomes: list[Outcome] = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for i, o in enumerate(pool.map(runner.test, mutants), 1):
                outcomes.append(o)
                print(f"[{i}/{len(mutants)}] {o.status:<12} {o.mutant.where():<38} [{o.mutant.operator}] "
                      f"{o.seconds:.0f}s {o.detail}".rstrip(), flush=True)
    finally:
        runner.close()
        if args.recheck:
            outcomes = [_recheck(runner, o) for o in outcomes]
    report(outcomes, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
