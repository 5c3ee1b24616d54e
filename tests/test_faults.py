"""Faults during a merge: killed at any moment, interrupted, out of disk, or pointed at a bad output path.

Every case ends with the previous output intact or the complete new one at the target, one readable error line,
and no temporary folder beside the target once the next run has started.

The signal tests (marked slow) run the real `merge run` in child processes. Importing torch costs seconds per
process, so a "zygote" imports the CLI once and forks one child per run (what `python -m mergekit_lite.cli` does,
minus the imports); the test signals the child directly, exactly as a user's `kill` would.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mergekit_lite import MergeConfig, merge
from mergekit_lite.cli import main
from mergekit_lite.errors import WriteError
from mergekit_lite.writers import checkpoint
from mergekit_lite.writers.checkpoint import BackgroundFile
from mergekit_lite.writers.staging import remove_stale

from .configs import config_data, demo_adapters
from .conftest import REPO, write_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, flock and renameat2 as on Linux")

ZYGOTE = r"""
import json, os, signal, sys
from pathlib import Path
import mergekit_lite.api, mergekit_lite.cli  # the slow imports, paid once

def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)

def inject(point, marker=None):
    import mergekit_lite.writers.atomic as atomic
    exchange = atomic.exchange
    if point == "pause_midway":  # mid-merge, announce it and wait there for the test's signal
        import time
        from mergekit_lite.writers.checkpoint import ShardedWriter
        begin, begun = ShardedWriter.begin, []
        def pausing_begin(self, name):
            begun.append(name)
            if len(begun) == 3:
                Path(marker).touch()
                time.sleep(60)
            return begin(self, name)
        ShardedWriter.begin = pausing_begin
    elif point == "before_exchange":
        atomic.exchange = lambda a, b: (kill_self(), exchange(a, b))[1]
    elif point == "after_exchange":
        atomic.exchange = lambda a, b: (exchange(a, b), kill_self())[0]
    elif point == "between_renames":  # no renameat2: the two-rename fallback, killed between its renames
        atomic.exchange = lambda a, b: False
        rename = Path.rename
        def rename_then_die(self, target):
            result = rename(self, target)
            if ".old-" in Path(target).name:
                kill_self()
            return result
        Path.rename = rename_then_die

def child(job):
    import resource
    # A shell running us in the background (`cmd &` without job control) starts every process with SIGINT ignored,
    # and Python then keeps ignoring it: give the child the interactive default a user's Ctrl-C meets.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if job.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # CPython ignores it at startup; prove the CLI does too
    for fd, name in ((0, os.devnull), (1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC), fd)
    if job.get("inject"):
        inject(job["inject"], job.get("marker"))
    code = 0
    try:
        mergekit_lite.cli.main(args=job["args"], prog_name="merge")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            child(job)
        finally:
            os._exit(70)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """One Python with the CLI imported that forks a `merge` child per job and reports its pid and exit code."""

    def __init__(self, logs: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=REPO, env=env)
        self.logs = logs
        self.runs = 0

    def start(self, args: list[str], **job: Any) -> int:
        """Fork a child running `merge ARGS`; return its pid at once."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.runs += 1
        self.stdout, self.stderr = self.logs / f"{self.runs}.out", self.logs / f"{self.runs}.err"
        job = {"args": args, "stdout": str(self.stdout), "stderr": str(self.stderr), **job}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return int(json.loads(self.process.stdout.readline())["pid"])

    def wait(self) -> int:
        """The last child's exit code (negative: killed by that signal)."""
        assert self.process.stdout is not None
        return int(json.loads(self.process.stdout.readline())["code"])

    def run(self, args: list[str], **job: Any) -> int:
        """Run `merge ARGS` to the end and return its exit code."""
        self.start(args, **job)
        return self.wait()

    def close(self) -> None:
        """Stop the zygote."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """The forking `merge` runner, shared by this module's signal tests."""
    runner = Zygote(tmp_path_factory.mktemp("zygote-logs"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~50 MB bf16 base and one adapter: a merge long enough (a few tenths of a second) to be killed midway."""
    from benchmarks.synthetic import Shape, build_adapter, build_base

    root = tmp_path_factory.mktemp("synthetic")
    shape = Shape(hidden=640, intermediate=1792, layers=4, vocab=6144, heads=8, kv_heads=4)
    build_base(root / "base", shape, shard_bytes=16 * 10**6)
    build_adapter(root / "adapter", shape, seed=0, rank=8)
    return root


def synthetic_config(root: Path, folder: Path, weight: float, name: str) -> Path:
    """A config merging the synthetic adapter at `weight` into out/ under `folder`, in 8 MB shards."""
    return write_config(folder, {
        "base_model": str(root / "base"), "method": "linear", "parameters": {"normalize": False},
        "adapters": [{"path": str(root / "adapter"), "weight": weight}],
        "output": {"path": str(folder / "work" / "out"), "shard_size": "8MB"},
    }, name)


def demo_config(demo: Path, folder: Path, out: Path) -> Path:
    """A config for a small merge of two demo adapters into `out`."""
    return write_config(folder, config_data(demo / "base", demo_adapters(demo, (1.0, 1.0), ("style", "math")), out))


def digest(folder: Path) -> dict[str, str] | None:
    """Every file's bytes (as a hash) under `folder` by relative path; None when there is no folder."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str = "out") -> list[str]:
    """Everything beside the target in its folder."""
    return sorted(p for p in os.listdir(parent) if p != name) if parent.exists() else []


def wait_for_staging(parent: Path, pid: int, timeout: float = 30.0) -> None:
    """Poll until the child has created its temporary folder beside the target."""
    deadline = time.monotonic() + timeout
    while not any(n.startswith(".out.tmp-") for n in leftovers(parent)):
        assert time.monotonic() < deadline, "the merge never created its temporary folder"
        os.kill(pid, 0)  # still alive
        time.sleep(0.002)


def one_error_line(text: str) -> str:
    """The stderr of a failed run: exactly one line, no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def outputs(zygote: Zygote, synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The previous output (weight 1) and the one a rerun makes (weight 0.5), and how long that rerun takes."""
    folder = tmp_path_factory.mktemp("kill")
    old_config = synthetic_config(synthetic, folder, 1.0, "old.yaml")
    new_config = synthetic_config(synthetic, folder, 0.5, "new.yaml")
    work = folder / "work"
    assert zygote.run(["run", str(old_config), "--device", "cpu", "--no-progress"]) == 0, zygote.stderr.read_text()
    shutil.copytree(work / "out", folder / "old")
    started = time.monotonic()
    assert zygote.run(["run", str(new_config), "--device", "cpu", "--no-progress", "--overwrite"]) == 0
    seconds = time.monotonic() - started
    new = digest(work / "out")
    shutil.rmtree(work / "out")
    shutil.copytree(folder / "old", work / "out")
    old = digest(work / "out")
    assert old != new and leftovers(work) == []
    args = ["run", str(new_config), "--device", "cpu", "--no-progress", "--overwrite"]
    return {"work": work, "old": old, "new": new, "saved": folder / "old", "seconds": seconds, "args": args}


def put_back_old(outputs: dict[str, Any]) -> None:
    """Make the target the previous output again (after a trial let the new one land)."""
    target = outputs["work"] / "out"
    if digest(target) != outputs["old"]:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(outputs["saved"], target)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_the_previous_output_or_the_new_one(zygote: Zygote, outputs: dict[str, Any]) -> None:
    work, seconds = outputs["work"], outputs["seconds"]
    seen = set()
    for fraction in (0.0, 0.2, 0.4, 0.6, 0.8, 1.05):
        pid = zygote.start(outputs["args"])
        if fraction == 0.0:
            wait_for_staging(work, pid)  # the moment the temporary folder appears
        else:
            time.sleep(fraction * seconds)
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            os.kill(pid, signal.SIGKILL)
        code = zygote.wait()
        now = digest(work / "out")
        assert now in (outputs["old"], outputs["new"]), f"killed at {fraction:.0%}: a partial output at the target"
        assert all(n.startswith((".out.tmp-", ".out.old-")) for n in leftovers(work)), leftovers(work)
        seen.add("old" if now == outputs["old"] else "new")
        if code == -signal.SIGKILL and leftovers(work):
            seen.add("killed while writing")
        put_back_old(outputs)
    assert {"old", "killed while writing"} <= seen
    assert zygote.run(outputs["args"]) == 0  # the next run removes what the killed ones left
    assert digest(work / "out") == outputs["new"] and leftovers(work) == []
    put_back_old(outputs)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "expected"), [("before_exchange", "old"), ("after_exchange", "new")])
def test_sigkill_right_before_or_after_the_swap_leaves_a_complete_output(
    zygote: Zygote, outputs: dict[str, Any], point: str, expected: str
) -> None:
    work = outputs["work"]
    assert zygote.run(outputs["args"], inject=point) == -signal.SIGKILL
    assert digest(work / "out") == outputs[expected]
    assert len(leftovers(work)) == 1 and leftovers(work)[0].startswith(".out.tmp-")
    assert zygote.run(outputs["args"]) == 0
    assert digest(work / "out") == outputs["new"] and leftovers(work) == []
    put_back_old(outputs)


@pytest.mark.slow
def test_without_renameat2_a_kill_between_the_renames_is_repaired_by_the_next_run(
    zygote: Zygote, outputs: dict[str, Any]
) -> None:
    work = outputs["work"]
    assert zygote.run(outputs["args"], inject="between_renames") == -signal.SIGKILL
    assert digest(work / "out") is None  # the fallback's window: no target, the previous output moved aside
    assert any(n.startswith(".out.old-") for n in leftovers(work))
    assert zygote.run(outputs["args"][:-1]) == 2  # no --overwrite: the previous output is put back, then kept
    warning, error = zygote.stderr.read_text().strip().splitlines()
    assert warning.startswith(f"restored the previous output {work / 'out'} from {work}/.out.old-")
    assert error == f"error: output {work / 'out'} already exists; pass --overwrite to replace it"
    assert digest(work / "out") == outputs["old"] and leftovers(work) == []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_sigint_and_sigterm_remove_the_temporary_folder_and_keep_the_previous_output(
    zygote: Zygote, outputs: dict[str, Any], signum: int, code: int, word: str
) -> None:
    work = outputs["work"]
    marker = zygote.logs / f"paused-{signum}"
    pid = zygote.start(outputs["args"], inject="pause_midway", marker=str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists():  # the merge is midway: its temporary folder holds part of the output
        assert time.monotonic() < deadline, "the merge never reached the middle"
        time.sleep(0.005)
    assert any(n.startswith(".out.tmp-") for n in leftovers(work))
    os.kill(pid, signum)
    assert zygote.wait() == code
    assert one_error_line(zygote.stderr.read_text()).startswith(f"{word}:")
    assert digest(work / "out") == outputs["old"] and leftovers(work) == []


@pytest.mark.slow
def test_file_size_limit_is_one_clear_error_and_leaves_nothing(zygote: Zygote, demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path, tmp_path / "work" / "out")
    code = zygote.run(["run", str(config), "--device", "cpu", "--no-progress"], fsize=64 * 1024)
    line = one_error_line(zygote.stderr.read_text())
    assert code == 1, line
    assert line.startswith("error: writing model.safetensors for the output ") and str(tmp_path / "work" / "out") in line
    assert "File too large" in line and "file size limit (65.54 kB)" in line and "shard_size" in line
    assert leftovers(tmp_path / "work") == [] and not (tmp_path / "work" / "out").exists()


def test_a_full_disk_in_the_writer_thread_is_one_clear_error_and_leaves_nothing(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_disk = Path("/dev/full")  # every write to it fails with ENOSPC
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: full_disk.open(mode), raising=False)
    out = tmp_path / "work" / "out"
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "linear",
                                    "adapters": [{"path": str(demo / "adapters" / "style")}], "output": {"path": str(out)}})
    with pytest.raises(WriteError, match=r"writing model\.safetensors for the output .*/work/out failed: No space left "
                                         r"on device; nothing was written to .*; the disk holding .* is full: the output "
                                         r"needs .* and .* is free; free .* or pick another output path"):
        merge(config, device="cpu", progress=False)
    assert leftovers(tmp_path / "work") == [] and not out.exists()


def test_a_failing_background_write_surfaces_in_the_caller_at_once_without_hanging() -> None:
    outcome: dict[str, Any] = {}

    def write_a_lot() -> None:
        file = BackgroundFile(Path("/dev/full"), queue_bytes=1 << 17)  # two of these buffers wait at most
        try:
            for count in range(1000):
                file.write(bytes(1 << 16))
            file.close()
        except OSError as error:
            outcome.update(error=error, count=count)
            file.abort()

    worker = threading.Thread(target=write_a_lot, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the caller hung on a failed background write"
    assert outcome["error"].errno == errno.ENOSPC and outcome["error"].filename == "/dev/full"
    assert outcome["count"] < 10  # surfaced within a few calls, not at close


def test_the_write_queue_holds_at_most_its_bytes_or_two_larger_buffers(tmp_path: Path) -> None:
    """The caller blocks once the buffers waiting for the writer thread would pass `queue_bytes` (two always may)."""
    release = threading.Event()
    file = BackgroundFile(tmp_path / "out.bin", queue_bytes=5 << 19)  # 2.5 MiB
    real_attempt = file._attempt

    def slow_attempt(action: Any, *args: Any) -> None:
        release.wait(20)
        real_attempt(action, *args)

    file._attempt = slow_attempt  # type: ignore[method-assign]
    returned: list[int] = []

    def write_four() -> None:
        for count in range(4):
            file.write(bytes(1 << 20))
            returned.append(count)

    writer = threading.Thread(target=write_four, daemon=True)
    writer.start()
    writer.join(timeout=0.5)
    assert returned == [0, 1]  # a third MiB would make 3 MiB waiting
    release.set()
    writer.join(timeout=20)
    file.close()
    assert returned == [0, 1, 2, 3] and (tmp_path / "out.bin").stat().st_size == 4 << 20


def test_too_little_free_space_fails_before_any_work(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    config = demo_config(demo, tmp_path, tmp_path / "work" / "out")
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert f"not enough space for the output {tmp_path / 'work' / 'out'}: it needs 1." in line
    assert "has 1.00 kB free; free 1." in line and "or pick another output path" in line
    assert not (tmp_path / "work").exists()


HOLD_LOCK = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
             "print('locked', flush=True); sys.stdin.read()")


DEAD, LIVE = "00000000000dead1", "1111111111111111"  # the random tails our staging folders have (16 hex digits)


def test_stale_temporary_folders_are_removed_but_a_live_runs_are_kept(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    for name in ("out", f".out.tmp-{DEAD}", ".out.old-dead_two", f".out.tmp-{LIVE}", ".out.tmp-notes"):
        (work / name).mkdir(parents=True)
        (work / name / "model.safetensors").write_bytes(b"partial")
    (work / "out" / "mergekit_lite_config.yaml").write_text("base_model: b\nadapters: [{path: a}]\n")  # a merge's
    (work / ".other.tmp-x").mkdir()  # another target's: not ours to touch (nor a user's .out.tmp-notes)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(work / f".out.tmp-{LIVE}")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "linear",
                                        "adapters": [{"path": str(demo / "adapters" / "style")}],
                                        "output": {"path": str(work / "out")}})
        with caplog.at_level(logging.INFO, logger="mergekit_lite"):
            merge(config, device="cpu", progress=False, overwrite=True)
        assert leftovers(work) == [".other.tmp-x", f".out.tmp-{LIVE}", ".out.tmp-notes"]
        assert (work / f".out.tmp-{LIVE}" / "model.safetensors").read_bytes() == b"partial"
        removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed ")]
        assert len(removed) == 2 and all("left by a merge that was killed" in m for m in removed)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert remove_stale(work / "out") == [work / f".out.tmp-{LIVE}"]  # its run is gone now
    assert leftovers(work) == [".other.tmp-x", ".out.tmp-notes"]


def test_a_previous_output_moved_aside_is_put_back_when_its_run_died(tmp_path: Path) -> None:
    (tmp_path / ".out.old-abc_1234").mkdir()
    (tmp_path / ".out.old-abc_1234" / "model.safetensors").write_bytes(b"previous")
    assert remove_stale(tmp_path / "out") == [tmp_path / ".out.old-abc_1234"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"previous" and leftovers(tmp_path) == []


def run_cli(config: Path, out: Path, *extra: str) -> Any:
    """`merge run CONFIG --out OUT` in this process."""
    return CliRunner().invoke(main, ["run", str(config), "--out", str(out), "--device", "cpu", "--no-progress", *extra])


def test_an_output_path_that_is_a_file_is_refused(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):  # in the config: click itself refuses --out FILE
        config = demo_config(demo, tmp_path / "cfg", out)
        result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress", "--overwrite"])
        assert result.exit_code == 2
        assert one_error_line(result.stderr).startswith(f"error: output {out} ")
        assert (tmp_path / "file").read_text() == "mine"
    assert leftovers(tmp_path) == ["cfg", "file"]


@pytest.mark.parametrize("where", ["base", "base/merged", "adapter", "adapter/sub/merged", "link/merged"])
def test_an_output_inside_an_input_is_refused(demo_copy: Path, tmp_path: Path, where: str) -> None:
    (tmp_path / "link").symlink_to(demo_copy / "base")  # a path through a symlink into the base is still the base
    roots = {"base": demo_copy / "base", "adapter": demo_copy / "adapters" / "math", "link": tmp_path / "link"}
    first, _, rest = where.partition("/")
    out = roots[first] / rest if rest else roots[first]
    config = demo_config(demo_copy, tmp_path / "cfg", tmp_path / "unused")
    before = digest(demo_copy)
    result = run_cli(config, out, "--overwrite")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: output {out.resolve()} lies inside ") and "pick an output path outside the inputs" in line
    assert digest(demo_copy) == before and leftovers(tmp_path, "link") == ["cfg", "demo"]


def test_an_output_that_holds_an_input_is_refused_even_with_overwrite(demo_copy: Path, tmp_path: Path) -> None:
    config = demo_config(demo_copy, tmp_path / "cfg", tmp_path / "unused")
    before = digest(demo_copy)
    result = run_cli(config, demo_copy, "--overwrite")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert line.startswith("error: the base model folder ") and f"lies inside the output {demo_copy}" in line
    assert digest(demo_copy) == before and leftovers(tmp_path, "demo") == ["cfg"]


def test_an_output_inside_a_hub_input_is_refused_once_the_hub_id_is_resolved(
    demo_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergekit_lite import api

    cached = {"org/base": demo_copy / "base"}
    resolve = api.resolve_model_dir
    monkeypatch.setattr(api, "resolve_model_dir", lambda config, ref, kind: cached.get(ref) or resolve(config, ref, kind))
    config = write_config(tmp_path / "cfg", {
        "base_model": "org/base", "method": "linear", "adapters": [{"path": str(demo_copy / "adapters" / "style")}],
        "output": {"path": str(demo_copy / "base" / "merged")},
    })
    before = digest(demo_copy)
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert f"lies inside the base model folder {demo_copy / 'base'}" in line
    assert digest(demo_copy) == before and not (demo_copy / "base" / "merged").exists()
