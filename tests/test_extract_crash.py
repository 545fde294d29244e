"""extract(out=...) survives crashes: several kill -9 at random moments (also mid-write and mid-finish) and a full
disk; running the same call again always ends with files byte-identical to an uninterrupted run's.

The kill -9 runs are children forked by tests/_crash_worker.py, a server that imports torch once (a fresh
interpreter per run would cost seconds each). The disk-full test mounts a small tmpfs and is skipped where mounting
is not allowed (not root, no CAP_SYS_ADMIN, not Linux).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hookkit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _progress import done_mask  # noqa: E402

from _crash_worker import LAYERS, RAGGED_LAYERS, model_and_batches  # noqa: E402

N, BATCH, SLEEP = 300, 8, 0.03  # 38 batches, ~1.2 s for a whole run
N_BATCHES = -(-N // BATCH)
# Seeds of the kill plans: 1, 3 and 4 put the torn write first, in the middle and last. More, to hunt for a rare
# failure: HOOKKIT_CRASH_SEEDS=0,1,2,3,4,5,6,7 pytest tests/test_extract_crash.py -k kill
EXIT = re.compile(r"(?:^|\D)exit (\d+) (-?\d+)$")
SEEDS = [int(s) for s in os.environ.get("HOOKKIT_CRASH_SEEDS", "1,3,4").split(",")]


# -- helpers -----------------------------------------------------------------------------------------------------------

def npy_data_offset(head: bytes) -> int | None:
    """Where the rows of a .npy file start (from its own header), or None if the header is not (yet) whole."""
    if len(head) < 12 or not head.startswith(b"\x93NUMPY"):
        return None
    if head[6] == 1:
        return 10 + struct.unpack("<H", head[8:10])[0]
    return 12 + struct.unpack("<I", head[8:12])[0]


def correct_rows(path: Path, ref: np.ndarray) -> set[int]:
    """Rows of ``path`` (a .npy or .npy.partial) that already hold the reference's bytes, counting only rows whose
    reference is not all zeros (so that a file of zeros, or holes, counts as nothing written)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    offset = npy_data_offset(data[:4096])
    if offset is None or offset > len(data):
        return set()
    want = np.ascontiguousarray(ref).view(np.uint8).reshape(len(ref), -1)
    row_bytes = want.shape[1]
    k = min(len(ref), max(0, (len(data) - offset) // row_bytes))
    got = np.frombuffer(data, np.uint8, count=k * row_bytes, offset=offset).reshape(k, row_bytes)
    ok = (got == want[:k]).all(axis=1) & want[:k].any(axis=1)
    return set(np.flatnonzero(ok).tolist())


def rows_in_place(out: Path, ref: dict[str, np.ndarray]) -> dict[str, set[int]]:
    return {n: correct_rows(out / f"{n}.npy.partial", ref[n]) | correct_rows(out / f"{n}.npy", ref[n]) for n in ref}


def first_difference(got: bytes, want: bytes) -> str | None:
    if got == want:
        return None
    if len(got) != len(want):
        return f"{len(got)} bytes, the uninterrupted run's: {len(want)}"
    at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"differs from the uninterrupted run's from byte {at} on"


def assert_same_as_reference(out: Path, ref_dir: Path) -> None:
    """Byte-identical layer files, the same manifest rows/shapes/dtypes/settings, no .partial left, numpy reads it."""
    assert not list(out.rglob("*.partial")), sorted(map(str, out.rglob("*")))
    for n in LAYERS:
        diff = first_difference((out / f"{n}.npy").read_bytes(), (ref_dir / f"{n}.npy").read_bytes())
        assert diff is None, f"{n}.npy {diff}"
        arr = np.load(out / f"{n}.npy")
        np.testing.assert_array_equal(arr, np.load(ref_dir / f"{n}.npy"))
        assert np.load(out / f"{n}.npy", mmap_mode="r").shape == arr.shape
    got_m = json.loads((out / "manifest.json").read_text())
    want_m = json.loads((ref_dir / "manifest.json").read_text())
    assert got_m.get("complete") is True
    for key in ("rows", "shapes", "dtypes", "settings"):
        assert got_m.get(key) == want_m.get(key), key


# -- kill -9 -----------------------------------------------------------------------------------------------------------

class Server:
    """tests/_crash_worker.py: runs one extract() per job in a forked child, and reports its lines and exit code."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_crash_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def run(self, out: Path, *, sleep: float = SLEEP, inject: str | None = None,
            kill_on: tuple[str, int] | None = None, delay: float = 0.0, timeout: float = 90,
            ragged: bool = False) -> tuple[int, list]:
        """One run; with ``kill_on=(word, k)``, kill -9 the child ``delay`` s after its k-th line starting with
        ``word``. Returns (exit code, the child's lines)."""
        job = {"out": str(out), "n": N, "batch": BATCH, "sleep": sleep, "inject": inject, "ragged": ragged}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        events: list[str] = []
        counts: dict[str, int] = {}
        pid = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                alive = "no child seen"
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        alive = f"child {pid} was still running (killed now)"
                    except ProcessLookupError:
                        alive = f"child {pid} had ended without its exit being reported"
                pytest.fail(f"extract run timed out after {timeout} s ({alive}; server exit code "
                            f"{self.proc.poll()}); the child's last lines: {events[-20:]}")
            if line is None:
                pytest.fail(f"the crash worker died; last lines: {events[-20:]}")
            end = EXIT.search(line)
            if end and pid is not None and int(end[1]) == pid:  # also after half a line (never, with write(2))
                return int(end[2]), events
            word, *rest = line.split() or [""]
            events.append(line)
            if word == "started":
                pid = int(rest[0])
            counts[word] = counts.get(word, 0) + 1
            if kill_on is not None and (word, counts[word]) == kill_on:
                if delay:
                    time.sleep(delay)
                with contextlib.suppress(ProcessLookupError):  # already gone: its exit code tells
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except Exception:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = Server()
    try:
        yield s
    finally:
        s.close()


def kill_plan(seed: int) -> list[dict]:
    """Five kills: at once, right before the first batch, mid-write (torn pwrite) and after a random number of
    batches (in random order), and after the first layer file is renamed into place; then a run that finishes."""
    rng = random.Random(seed)
    middle = [
        {"what": "torn write", "inject": f"tear:{rng.randint(2, 16)}"},
        {"what": "random", "kill_on": ("batch", rng.randint(1, 6)), "delay": rng.uniform(0, 1.5 * SLEEP)},
        {"what": "random", "kill_on": ("batch", rng.randint(1, 6)), "delay": rng.uniform(0, 1.5 * SLEEP)},
    ]
    rng.shuffle(middle)
    return [
        {"what": "as soon as it starts", "kill_on": ("started", 1)},
        {"what": "before the first batch", "kill_on": ("begin", 1), "delay": rng.uniform(0, 0.01)},
        *middle,
        {"what": "mid-finish, after the first layer file is renamed", "inject": "rename"},
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_several_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_files(server, seed, tmp_path):
    ref_dir, out = tmp_path / "ref", tmp_path / "feats"
    code, events = server.run(ref_dir, sleep=0)
    assert code == 0 and "finished" in events, events
    ref = {n: np.load(ref_dir / f"{n}.npy") for n in LAYERS}
    assert ref["3"].any(axis=1).all() and ref["1"].any(axis=1).sum() > N // 2  # zeros could not pass as rows

    plan = kill_plan(seed)
    placed = {n: set() for n in LAYERS}
    progress_seen = 0
    for step in plan:
        what = step.pop("what")
        code, events = server.run(out, **step)
        assert code == -signal.SIGKILL, (f"seed {seed}, kill {what!r} {step}: the run was not killed (exit {code}); "
                                         f"an injected kill that never fired means extract no longer writes rows "
                                         f"with os.pwrite / renames with os.replace; lines: {events[-8:]}")
        assert not any(e.startswith("error") for e in events), events
        now = rows_in_place(out, ref)
        for n in LAYERS:
            lost = placed[n] - now[n]
            assert not lost, f"seed {seed}, after kill {what!r}: {len(lost)} rows of {n} already in place were lost"
            final = out / f"{n}.npy"
            if final.exists():  # never an incomplete file under the final name
                diff = first_difference(final.read_bytes(), (ref_dir / f"{n}.npy").read_bytes())
                assert diff is None, f"seed {seed}, after kill {what!r}: {n}.npy is there and {diff}"
        if step.get("inject") != "rename":
            progress_seen += any(len(now[n]) > len(placed[n]) for n in LAYERS)
        placed = now
    assert progress_seen >= 1, "no kill before the finish came after a row was written: the test tested too little"
    assert min(len(placed[n]) for n in LAYERS) > N // 2  # the last kill came after most rows were written

    code, events = server.run(out)
    assert code == 0 and "finished" in events and not any(e.startswith("error") for e in events), events
    assert events.count("batch") < N_BATCHES // 2, "the last run recomputed what was already written"
    assert_same_as_reference(out, ref_dir)

    code, events = server.run(out)  # a finished run returns at once, files untouched
    assert code == 0 and events.count("batch") == 0, events
    assert_same_as_reference(out, ref_dir)


RAGGED_FILES = [f"{n}{suffix}" for n in RAGGED_LAYERS for suffix in (".npy", ".offsets.npy")]


def recorded_rows(out: Path) -> int:
    """Rows the progress files record as written."""
    return int(done_mask(out).sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_kill_9_at_random_moments_on_ragged_token_layers_then_resume_gives_the_uninterrupted_files(server, seed,
                                                                                                   tmp_path):
    """The same kills on ragged layers (per-rank token chunks and a shared index, assembled at the finish): the
    rows recorded as done never go backwards, and the last run ends with byte-identical files."""
    ref_dir, out = tmp_path / "ref", tmp_path / "feats"
    code, events = server.run(ref_dir, sleep=0, ragged=True)
    assert code == 0 and "finished" in events, events
    recorded = progress_seen = 0
    for step in kill_plan(seed):
        what = step.pop("what")
        code, events = server.run(out, ragged=True, **step)
        assert code == -signal.SIGKILL, f"seed {seed}, kill {what!r} {step}: not killed (exit {code}): {events[-8:]}"
        assert not any(e.startswith("error") for e in events), events
        now = recorded_rows(out)
        assert now >= recorded or step.get("inject") == "rename", f"seed {seed}, after {what!r}: recorded rows fell"
        progress_seen += now > recorded
        recorded = now
        for name in RAGGED_FILES:  # never an incomplete file under a final name
            if (out / name).exists():
                assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), (seed, what, name)
    assert progress_seen >= 1, "no kill came after a row was recorded: the test tested too little"
    code, events = server.run(out, ragged=True)
    assert code == 0 and "finished" in events and not any(e.startswith("error") for e in events), events
    assert events.count("batch") < N_BATCHES // 2, "the last run recomputed what was already written"
    for name in RAGGED_FILES:
        diff = first_difference((out / name).read_bytes(), (ref_dir / name).read_bytes())
        assert diff is None, f"seed {seed}: {name} {diff}"
    assert not list(out.rglob("*.partial")), sorted(map(str, out.rglob("*")))
    got_m, want_m = (json.loads((d / "manifest.json").read_text()) for d in (out, ref_dir))
    for key in ("rows", "shapes", "dtypes", "settings", "ragged"):
        assert got_m.get(key) == want_m.get(key), key


# -- disk full ---------------------------------------------------------------------------------------------------------

def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs under tmp_path (root only); yields its folder; unmounted after the test."""
    where = tmp_path / "small"
    where.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux and mount(8)")
    done = _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        gc.collect()  # memmaps of files on it
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_is_an_extract_error_and_the_same_call_completes_once_there_is_room(small_tmpfs, tmp_path):
    n, batch = 2560, 32  # (64 + 32) float32 per row: ~960 KiB of rows, on a 256 KiB tmpfs
    model, batches = model_and_batches(n, batch)
    ref_dir = tmp_path / "ref"
    hookkit.extract(model, LAYERS, batches, out=ref_dir, progress=False)
    ref = {name: np.load(ref_dir / f"{name}.npy") for name in LAYERS}
    assert ref["3"].any(axis=1).all()
    out = small_tmpfs / "feats"

    with pytest.raises(hookkit.ExtractError) as info:
        hookkit.extract(model, LAYERS, batches, out=out, progress=False)
    message = str(info.value)
    assert "No space left" in message and "run the same call again" in message, message

    def nothing_lost_so_far() -> dict[str, set[int]]:
        manifest = json.loads((out / "manifest.json").read_text())  # still whole JSON
        assert not manifest.get("complete")
        for p in out.rglob("*.json"):
            if not p.name.startswith("."):  # a hidden temporary file may be cut short; the real ones may not
                json.loads(p.read_text())
        assert not any((out / f"{name}.npy").exists() for name in LAYERS)  # never mistaken for complete
        return rows_in_place(out, ref)

    before = nothing_lost_so_far()
    assert all(len(before[name]) > 0 for name in LAYERS), {k: len(v) for k, v in before.items()}

    with pytest.raises(hookkit.ExtractError, match="No space left"):  # still full: fails again, loses nothing
        hookkit.extract(model, LAYERS, batches, out=out, progress=False)
    again = nothing_lost_so_far()
    assert all(before[name] <= again[name] for name in LAYERS)

    grown = _mount("-o", "remount,size=4m", str(small_tmpfs))
    assert grown.returncode == 0, grown.stderr
    feats = hookkit.extract(model, LAYERS, batches, out=out, progress=False)
    try:
        for name in LAYERS:
            np.testing.assert_array_equal(feats[name], ref[name])
    finally:
        del feats
    assert_same_as_reference(out, ref_dir)
