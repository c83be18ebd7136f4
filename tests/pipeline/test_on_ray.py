"""`prvr ingest --ray`: decoding and encoding on a local Ray cluster, with the commits in the driver."""
import json
import os
import signal
from pathlib import Path

import pytest

from prvr_cli.errors import ExitCode
from prvr_cli.library import Library
from tests.helpers import PALETTE, TINY_CLIP, make_video

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'prvr[ray]'")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance (2 CPUs) for the module's tests, shut down after them."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _worker_pids() -> list[int]:
    """The processes of the prvr Ray actors (Ray titles them ray::EncodeWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::EncodeWorker"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _hits(cli, query: str) -> list:
    code, out, err = cli("search", query, "--json", "--candidates", "exact")
    assert code == 0, err
    return [(h["path"], h["score"], h["highlights"]) for h in json.loads(out)["results"]]


def test_ray_ingest_stores_what_a_local_ingest_stores_and_reports_a_bad_file(cli, videos, tmp_path):
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    code, summary, err = cli.ingest(videos, extra=["--ray", "local", "--workers", "2"])
    assert code == ExitCode.PARTIAL and summary["new"] == 4 and summary["failed"] == 1
    assert [line for line in err.splitlines() if "broken.mp4" in line] and "Traceback" not in err
    on_ray = _hits(cli, "a red screen")
    local = cli.index.with_name("local_index")
    code, out, err = cli("ingest", videos, "--json", "--quiet", "--index", local, index=False, tiny=True)
    assert code == ExitCode.PARTIAL
    cli.index, ray_index = local, cli.index
    assert _hits(cli, "a red screen") == on_ray        # the same prototypes, highlights and scores
    cli.index = ray_index
    code, summary, _ = cli.ingest(videos, extra=["--ray", "local"])   # a rerun skips what is stored
    assert summary["new"] == 0 and summary["unchanged"] == 4 and summary["failed"] == 1


def test_a_killed_worker_is_restarted_and_its_file_retried(tmp_path):
    library_dir = tmp_path / "videos"
    for n in range(6):
        make_video(library_dir / f"v{n}.mp4", [PALETTE[n % 6], PALETTE[(n + 1) % 6]] * 2)
    killed = []

    class KillOnFirstVideo:
        """Progress that kills every prvr Ray actor (kill -9) when the first video is committed."""

        def begin(self, total): pass
        def frames_done(self, n): pass
        def error(self, message): pass

        def video_done(self):
            if not killed:
                killed.extend(_worker_pids())
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)

    library = Library.open(tmp_path / "index", tmp_path / "cache", device="cpu")
    report = library.ingest([library_dir], clip_model=TINY_CLIP, clip_pretrained="none", workers=2, ray="local",
                            progress=KillOnFirstVideo())
    assert killed, "no Ray actor process was found to kill"
    assert report.summary.new == 6 and report.summary.failed == 0, report.summary.errors
    assert len(library.videos()) == 6
    assert not set(killed) & set(_worker_pids())         # those processes are gone; the actors ran again elsewhere


def test_ray_without_a_cluster_at_the_address_is_a_usage_error(cli, videos):
    ray.shutdown()
    try:
        code, _, err = cli("ingest", videos, "--ray", "127.0.0.1:1", "--quiet", tiny=True)
        assert code == 2 and "--ray 127.0.0.1:1" in err and "ray start --head" in err
        assert not cli.index.exists()                       # nothing was made before the cluster was found
    finally:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
