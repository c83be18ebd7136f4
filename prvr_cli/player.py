"""Open a video in the user's player at a moment: mpv or VLC with their start option, else the OS opener.

The command is an argument list, never a shell string, so any file name (spaces, quotes, `$`) is passed
as it is.
"""
from __future__ import annotations

import shutil
import subprocess
import sys


def player_command(path: str, start: float, which=shutil.which, platform: str = sys.platform) -> list[str]:
    """The argument list that plays `path` from `start` seconds (the OS opener cannot seek: it starts at 0)."""
    seconds = f"{max(0.0, start):.2f}"
    if which("mpv"):
        return [which("mpv"), f"--start={seconds}", "--", path]
    for vlc in ("vlc", "cvlc"):
        if which(vlc):
            return [which(vlc), f"--start-time={seconds}", path]
    if platform == "darwin":
        return ["open", path]
    if platform.startswith("win"):
        return ["cmd", "/c", "start", "", path]
    opener = which("xdg-open")
    if opener:
        return [opener, path]
    raise FileNotFoundError("no video player found: install mpv or VLC (or xdg-open)")


def launch(command: list[str]) -> None:
    """Start the player detached from this process (its output does not reach ours)."""
    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
