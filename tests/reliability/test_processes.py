"""Reliability across processes: kill -9 during ingest, two writers at once, search during ingest, Ctrl-C.

Every `prvr ingest` here is a real process killed with a real signal. Starting
Python with torch and open_clip takes 5-15 s on a busy 2-core machine, so most
of them are forked from a small server that imported those once (a "zygote");
each child then runs `prvr_cli.cli.main(argv)`, exactly what `prvr ingest` runs.
One test also kills a `python -m prvr_cli ingest` started from scratch.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from prvr_cli.errors import ExitCode

from tests.helpers import PALETTE, TINY_CLIP, make_video

ROOT = Path(__file__).resolve().parents[2]

SERVER = r'''
import json, os, signal, sys, traceback
sys.path.insert(0, sys.argv[1])
import numpy, torch, open_clip, decord, pyarrow, lancedb  # noqa: F401  (the slow imports, done once)
import prvr_cli.cli  # noqa: F401


def crash_hook(spec):
    """SIGKILL this process before or after the nth call of a write, decode or encode step."""
    import lancedb.db
    import lancedb.table
    import prvr_cli.pipeline.encode

    targets = {"add": (lancedb.table.LanceTable, "add"), "merge": (lancedb.table.LanceTable, "_do_merge"),
               "delete": (lancedb.table.LanceTable, "delete"), "update": (lancedb.table.LanceTable, "update"),
               "create": (lancedb.db.LanceDBConnection, "create_table"),
               "optimize": (lancedb.table.LanceTable, "optimize"),
               "encode": (prvr_cli.pipeline.encode.FrameTextEncoder, "encode_images"), "decode": (decord.VideoReader, "get_batch")}
    owner, name = targets[spec["target"]]
    real = getattr(owner, name)
    count = [0]

    def hooked(*args, **kwargs):
        count[0] += 1
        if count[0] == spec["nth"] and spec["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if count[0] == spec["nth"] and spec["when"] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, hooked)


children = {}
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                os.dup2(out, 1)
                os.dup2(err, 2)
                os.environ.update(req.get("env", {}))
                if req.get("uid") is not None:
                    os.setgid(req["uid"])
                    os.setuid(req["uid"])
                if req.get("crash"):
                    crash_hook(req["crash"])
                if req.get("slow"):  # a slow writer: sleep before each commit of a video's row
                    import time
                    import lancedb.table
                    real_merge = lancedb.table.LanceTable._do_merge

                    def slow_merge(*args, **kwargs):
                        time.sleep(req["slow"])
                        return real_merge(*args, **kwargs)

                    lancedb.table.LanceTable._do_merge = slow_merge
                from prvr_cli.cli import main
                code = main(req["argv"])
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                traceback.print_exc()
            os._exit(code)
        children[pid] = True
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"pid": req["pid"], "code": code}), flush=True)
'''


class Zygote:
    """Forks `prvr` processes from one interpreter that has already imported torch and open_clip."""

    def __init__(self, tmp: Path, env: dict):
        script = tmp / "zygote.py"
        script.write_text(SERVER)
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, str(script), str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def spawn(self, argv: list, crash: dict | None = None, uid: int | None = None, env: dict | None = None,
              slow: float = 0.0):
        self.n += 1
        out, err = self.tmp / f"run{self.n}.out", self.tmp / f"run{self.n}.err"
        pid = self._ask({"op": "spawn", "argv": [str(a) for a in argv], "out": str(out), "err": str(err),
                         "crash": crash, "uid": uid, "env": env or {},
                         "slow": slow})["pid"]
        return Child(self, pid, out, err)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    def __init__(self, zygote, pid, out, err):
        self.zygote, self.pid, self.out_path, self.err_path = zygote, pid, out, err
        self.code = None

    def wait(self) -> int:
        if self.code is None:
            self.code = self.zygote._ask({"op": "wait", "pid": self.pid})["code"]
        return self.code

    def kill(self, sig=signal.SIGKILL) -> int:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        return self.wait()

    @property
    def out(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVR_")}
    env.update(XDG_CONFIG_HOME=str(tmp / "config"), XDG_CACHE_HOME=str(tmp / "cache"), PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zygote")
    os.chmod(tmp, 0o777)  # children that drop privileges write their logs here
    z = Zygote(tmp, _env(tmp))
    yield z
    z.close()


def ingest_argv(index: Path, *paths, extra=()) -> list:
    return ["ingest", *paths, "--index", index, "--clip-model", TINY_CLIP, "--clip-pretrained", "none",
            "--quiet", "--json", "--workers", "2", "--batch-size", "16", *extra]


def check_index(index: Path) -> dict[str, str]:
    """Assert the index holds only complete videos; return path -> content hash of each."""
    from prvr_cli.index.store import Index

    idx = Index.open(index)
    videos, frames = idx.videos, idx.frames
    if videos is None:
        return {}
    assert frames is not None, "a videos table without a frames table"
    v = videos.to_arrow().select(["path", "content_hash", "n_frames", "timestamps", "proto_clip", "proto_frame",
                                  "attn_clip", "attn_frame"]).to_pylist()
    paths = [r["path"] for r in v]
    assert len(paths) == len(set(paths)), "a video is indexed twice"
    f = {(r["path"], r["content_hash"]): r
         for r in frames.to_arrow().select(["path", "content_hash", "features", "timestamps"]).to_pylist()}
    lp = None
    for r in v:
        key = (r["path"], r["content_hash"])
        assert key in f, f"{r['path']} has prototypes but no frame features"
        n = r["n_frames"]
        assert n > 0 and len(r["timestamps"]) == n == len(f[key]["features"]) == len(f[key]["timestamps"])
        lp = lp or len(r["proto_clip"])
        assert len(r["proto_clip"]) == len(r["proto_frame"]) == lp
        assert len(r["attn_clip"]) == len(r["attn_frame"]) == lp * n
    return {r["path"]: r["content_hash"] for r in v}


def search_ok(cli, index: Path, n_expected: int | None = None) -> list[str]:
    code, out, err = cli("search", "a colored screen", "-k", "10000", "--json", "--keep-duplicates", "--index", index,
                         index=False)
    if n_expected == 0:
        assert code == ExitCode.NO_INDEX, err
        return []
    assert code == 0, err
    hits = json.loads(out)["results"]
    if n_expected is not None:
        assert len(hits) == n_expected
    return [h["path"] for h in hits]


def n_complete(index: Path) -> int:
    try:
        return len(check_index(index))
    except Exception:  # not created yet
        return 0


def warm_up() -> None:
    """Load the tiny CLIP in this process once, so in-test searches are quick."""
    import warnings

    from prvr_cli.pipeline.encode import FrameTextEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": expected here
        FrameTextEncoder.load(TINY_CLIP, "none", "cpu")


def wait_for(condition, timeout=60.0, every=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return False


def lock_holder(index: Path) -> str:
    try:
        return (index / ".lock").read_text().strip()
    except OSError:
        return ""


def test_kill_9_during_ingest_twenty_times(zygote, cli, tmp_path):
    """20 SIGKILLs at random moments of the work, then 9 at chosen write/decode/encode steps; then a clean run."""
    rng = random.Random(int(os.environ.get("PRVR_TEST_SEED", "5")))
    lib, index = tmp_path / "lib", tmp_path / "index"
    for i in range(8):
        make_video(lib / f"v{i:03d}.mp4", [PALETTE[i % 6], PALETTE[(i + 2) % 6]])
    n_files, log = 8, []

    def start(**kwargs):
        """Spawn an ingest and return once it holds the lock (start-up done: it is about to plan and work)."""
        child = zygote.spawn(ingest_argv(index, lib), **kwargs)
        assert wait_for(lambda: lock_holder(index) == str(child.pid) or child.err.count("indexed"), 120, 0.01), \
            child.err
        return child, time.monotonic()

    # one uninterrupted run of 8 videos measures how long the work takes once started
    first, t0 = start()
    assert first.wait() == 0, first.err
    work = time.monotonic() - t0

    def mutate(r: int):
        nonlocal n_files
        for _ in range(3):  # new videos
            make_video(lib / f"v{n_files:03d}.mp4", [PALETTE[n_files % 6], PALETTE[(n_files + 1) % 6]])
            n_files += 1
        victim = lib / f"v{rng.randrange(n_files):03d}.mp4"  # a changed video: its rows are replaced
        make_video(victim, [PALETTE[(r + k) % 6] for k in range(3)])

    def n_versions() -> int:
        return len(list((index / "db" / "frames.lance" / "_versions").glob("*.manifest")))

    for r in range(20):
        mutate(r)
        versions = n_versions()
        child, _ = start()
        if r % 2:  # while writing: once this run has committed its first frames, at a random moment after
            assert wait_for(lambda: n_versions() > versions or child.err.count("indexed"), 60, 0.005), child.err
            delay, phase = rng.uniform(0.0, 0.5), "write"
        else:  # from planning through decoding and encoding the first videos
            delay, phase = rng.uniform(0.0, work * 0.6), "work"
        time.sleep(delay)
        code = child.kill()
        before = check_index(index)
        log.append((f"{phase}+{delay:.2f}s", code, len(before)))
        assert code in (-signal.SIGKILL, 0), (code, child.err)
        if before:
            assert set(search_ok(cli, index, len(before))) == set(before)
    steps = [("create", 1, "after"), ("add", 1, "before"), ("add", 1, "after"), ("merge", 1, "after"),
             ("delete", 3, "after"), ("decode", 2, "after"), ("encode", 1, "after"), ("optimize", 1, "before"),
             ("update", 1, "after")]
    for r, (target, nth, when) in enumerate(steps):
        mutate(r)
        if target == "create":  # a kill while the very first tables are created, in a fresh index
            fresh = tmp_path / "fresh"
            child = zygote.spawn(ingest_argv(fresh, lib / "v000.mp4"), crash={"target": target, "nth": nth,
                                                                              "when": when})
            assert child.wait() == -signal.SIGKILL, child.err
            check_index(fresh)
            again = zygote.spawn(ingest_argv(fresh, lib / "v000.mp4"))
            assert again.wait() == 0, again.err
            assert len(check_index(fresh)) == 1
            log.append(("create#1/after (fresh index)", -signal.SIGKILL, 1))
            continue
        if target == "update":  # touch a file: the run updates its mtime
            t = time.time() + 100 + r
            os.utime(lib / "v001.mp4", (t, t))
        child = zygote.spawn(ingest_argv(index, lib), crash={"target": target, "nth": nth, "when": when})
        code = child.wait()
        assert code in (-signal.SIGKILL, 0), (target, code, child.err)
        log.append((f"{target}#{nth}/{when}", code, len(check_index(index))))
    # what is complete and current must not be redone
    states = check_index(index)
    from prvr_cli.pipeline.discover import content_hash
    current = {str(p): content_hash(p) for p in sorted(lib.iterdir())}
    done = sum(states.get(p) == h for p, h in current.items())
    final = zygote.spawn(ingest_argv(index, lib))
    assert final.wait() == 0, final.err
    summary = json.loads(final.out)
    assert summary["unchanged"] == done, (summary, log)
    assert summary["new"] + summary["changed"] == len(current) - done
    assert check_index(index) == current
    assert set(search_ok(cli, index, len(current))) == set(current)
    kills = sum(c == -signal.SIGKILL for _, c, _ in log)
    print(f"\nkill log (moment or step, exit, complete videos): {log}\n"
          f"work of the first run {work:.1f}s, {kills} killed, {len(current)} videos at the end")
    assert kills >= 20


def test_two_writers_lock_wait_and_search_during_ingest(zygote, cli, tmp_path):
    lib, extra, index = tmp_path / "lib", tmp_path / "extra", tmp_path / "index"
    for i in range(16):
        make_video(lib / f"a{i:02d}.mp4", [PALETTE[i % 6], PALETTE[(i + 3) % 6]], seconds_per_color=1.5)
    for i in range(3):
        make_video(extra / f"b{i}.mp4", [PALETTE[i]])
    warm_up()
    first = zygote.spawn(ingest_argv(index, lib), slow=0.5)  # holds the lock for 8 s or more
    assert wait_for(lambda: lock_holder(index) == str(first.pid)), first.err
    waiting = zygote.spawn(ingest_argv(index, lib, extra, extra=["--wait"]))
    refused = zygote.spawn(ingest_argv(index, lib, extra))
    assert refused.wait() == ExitCode.LOCKED, refused.err
    assert f"pid {first.pid}" in refused.err and "--wait" in refused.err
    assert "Traceback" not in refused.err
    assert wait_for(lambda: "waiting" in waiting.err, 60), waiting.err
    assert f"pid {first.pid}" in waiting.err
    # searches while the first writer commits: each sees one whole table version
    seen = []
    while True:
        n = len(check_index(index)) if (index / "db").exists() else 0
        paths = search_ok(cli, index) if n else []
        assert len(paths) == len(set(paths)) and all(Path(p).exists() for p in paths)
        seen.append(len(paths))
        if not wait_for(lambda: lock_holder(index) != str(first.pid), 0.1):
            continue
        break
    assert first.wait() == 0, first.err
    assert waiting.wait() == 0, waiting.err
    summary = json.loads(waiting.out)
    assert summary["unchanged"] == 16 and summary["new"] == 3
    states = check_index(index)
    assert len(states) == 19
    assert seen == sorted(seen), seen  # versions only grow
    print(f"\nsearch result counts seen during ingest: {seen}")


def test_stale_lock_after_a_real_process_is_killed(zygote, cli, tmp_path):
    """A `python -m prvr_cli ingest` started from scratch is killed -9 mid-run; its lock file stays behind."""
    lib, index = tmp_path / "lib", tmp_path / "index"
    for i in range(20):
        make_video(lib / f"c{i:02d}.mp4", [PALETTE[i % 6], PALETTE[(i + 1) % 6]])
    proc = subprocess.Popen([sys.executable, "-m", "prvr_cli", *map(str, ingest_argv(index, lib))],
                            env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)

    manifests = index / "db" / "videos.lance" / "_versions"  # one more per video committed
    assert wait_for(lambda: proc.poll() is not None or len(list(manifests.glob("*.manifest"))) >= 3, 180, 0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert lock_holder(index) == str(proc.pid)  # the stale holder's pid is still in the file
    kept = check_index(index)
    resumed = zygote.spawn(ingest_argv(index, lib))
    assert resumed.wait() == 0, resumed.err
    summary = json.loads(resumed.out)
    assert 0 < len(kept) < 20
    assert summary["unchanged"] == len(kept) and summary["new"] == 20 - len(kept)
    assert len(check_index(index)) == 20


def test_ctrl_c_keeps_finished_videos(zygote, cli, tmp_path):
    lib, index = tmp_path / "lib", tmp_path / "index"
    for i in range(12):
        make_video(lib / f"d{i:02d}.mp4", [PALETTE[i % 6]] * 2)
    child = zygote.spawn(ingest_argv(index, lib))
    assert wait_for(lambda: n_complete(index) >= 1, 60)
    code = child.kill(signal.SIGINT)
    assert code in (ExitCode.INTERRUPTED, 0), child.err
    if code == ExitCode.INTERRUPTED:
        assert "interrupted; finished videos are kept" in child.err
    assert "Traceback" not in child.err
    kept = check_index(index)
    again = zygote.spawn(ingest_argv(index, lib))
    assert again.wait() == 0 and json.loads(again.out)["unchanged"] == len(kept), again.err


def test_unreadable_file_as_an_unprivileged_user(zygote, tmp_path):
    """chmod 000 for real: as root, the child drops to nobody (permissions do not bind root)."""
    uid = 65534 if os.geteuid() == 0 else None
    if uid is not None and any(not p.stat().st_mode & 0o001 for p in Path(os.__file__).parents):
        pytest.skip("this Python is not readable by an unprivileged user (test_reliability_inputs covers it as root)")
    top = Path(tempfile.mkdtemp(prefix="prvr-perm-"))
    try:
        os.chmod(top, 0o777)
        lib, index = top / "lib", top / "index"
        make_video(lib / "ok.mp4", [PALETTE[0]])
        secret = make_video(lib / "secret.mp4", [PALETTE[1]])
        for p in (lib, secret.parent):
            os.chmod(p, 0o777)
        os.chmod(lib / "ok.mp4", 0o644)
        secret.chmod(0)
        env = {"XDG_CACHE_HOME": str(top / "cache"), "XDG_CONFIG_HOME": str(top / "config"), "HOME": str(top)}
        child = zygote.spawn(ingest_argv(index, lib), uid=uid, env=env)
        assert child.wait() == ExitCode.PARTIAL, child.err
        lines = [line for line in child.err.splitlines() if "secret.mp4" in line]
        assert len(lines) == 1 and "Permission denied" in lines[0], child.err
        summary = json.loads(child.out)
        assert summary["new"] == 1 and summary["failed"] == 1
    finally:
        import shutil
        shutil.rmtree(top, ignore_errors=True)
