"""`prvr open N` and `search --open N`: the player's argument list, never a shell string."""
import json
import os
import shlex
import time

import pytest

from prvr_cli.player import player_command
from tests.helpers import PALETTE, make_video

ODD = """it's a "$HOME" `test` ; rm -rf x.mp4"""


def test_player_command_prefers_mpv_then_vlc_then_the_os_opener():
    path = f"/videos/{ODD}"
    tools = {"mpv": "/usr/bin/mpv", "vlc": "/usr/bin/vlc", "xdg-open": "/usr/bin/xdg-open"}
    assert player_command(path, 7.256, tools.get) == ["/usr/bin/mpv", "--start=7.26", "--", path]
    no_mpv = {k: v for k, v in tools.items() if k != "mpv"}
    assert player_command(path, 3, no_mpv.get) == ["/usr/bin/vlc", "--start-time=3.00", path]
    assert player_command(path, 3, {"xdg-open": "/usr/bin/xdg-open"}.get, "linux") == ["/usr/bin/xdg-open", path]
    assert player_command(path, 3, {}.get, "darwin") == ["open", path]
    with pytest.raises(FileNotFoundError, match="mpv or VLC"):
        player_command(path, 3, {}.get, "linux")


def test_open_plays_the_hit_from_its_highlight_with_the_name_intact(cli, tmp_path, monkeypatch):
    library = tmp_path / "lib"
    make_video(library / f"{ODD}.mp4", [PALETTE[0], PALETTE[1], PALETTE[2]], fps=10)
    assert cli.ingest(library)[0] == 0
    bin_dir, record = tmp_path / "bin", tmp_path / "argv.json"
    bin_dir.mkdir()
    fake = bin_dir / "mpv"
    fake.write_text(f"#!/bin/sh\nexec {os.sys.executable} -c 'import json,sys; "
                    f"json.dump(sys.argv[1:], open(\"{record}\", \"w\"))' \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = cli("search", "red", "--json")
    assert code == 0, err
    hit = json.loads(out)["results"][0]
    code, out, err = cli("open", "1", "--print", index=False)
    start = hit["highlights"][0]["start"]
    assert code == 0 and shlex.split(out) == [str(fake), f"--start={start:.2f}", "--", hit["path"]]  # pastes safely
    code, _, err = cli("open", "1", index=False)
    assert code == 0 and "playing" in err
    played = None
    for _ in range(200):     # the player runs on its own: wait until it has written the whole record
        try:
            played = json.loads(record.read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.1)
    assert played == [f"--start={start:.2f}", "--", hit["path"]]
    code, _, err = cli("open", "5", index=False)
    assert code == 2 and "choose 1 to 1" in err
