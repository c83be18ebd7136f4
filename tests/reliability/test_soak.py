"""The soak test (examples/soak.py), marked slow: run with `pytest -m slow tests/test_reliability_soak.py`.

PRVR_SOAK_MINUTES sets its length (default 3); the result of a longer run is in docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_ingest_and_search_loop(tmp_path):
    minutes = os.environ.get("PRVR_SOAK_MINUTES", "3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVR_")}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "soak.py"), "--minutes", minutes,
                        "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert not summary["failures"] and summary["rounds"] >= 3
    # memory must not keep growing: the last round within 25% (+50 MB) of the level after warm-up
    assert summary["rss_mb_last"] <= summary["rss_mb_after_warmup"] * 1.25 + 50, summary
