"""`prvr bench seeds`: mean and min-max over seeds from bench records and train runs."""
import json

import pytest

from prvr_cli.bench.seeds import aggregate, markdown
from prvr_cli.errors import UsageError


def record(path, seed, sumr_a, sumr_b):
    rows = [{"rows": [["methods", "a"]], "metrics": {"R@1": 1, "R@5": 2, "R@10": 3, "R@100": 4, "SumR": sumr_a},
             "bytes_per_video": 100},
            {"rows": [["methods", "b"]], "metrics": {"R@1": 1, "R@5": 2, "R@10": 3, "R@100": 4, "SumR": sumr_b},
             "bytes_per_video": 200}]
    path.write_text(json.dumps({"data": {"collection": "toy"}, "seed": seed, "results": rows}))
    return path


def test_mean_and_spread_per_row_from_records_and_runs(tmp_path):
    paths = [record(tmp_path / f"r{s}.json", s, 100 + s, 90 - 2 * s) for s in range(3)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"data": {"collection": "toy"}, "seed": 0, "preset": "p.json",
                                                  "test": {"R@1": 1, "R@5": 2, "R@10": 3, "R@100": 4, "SumR": 95}}))
    entries = aggregate([*paths, f"mine={run}"])
    by = {e["label"]: e for e in entries}
    assert by["a"]["seeds"] == [0, 1, 2] and by["a"]["metrics"]["SumR"] == {"mean": 101, "min": 100, "max": 102}
    assert by["b"]["metrics"]["SumR"]["mean"] == 88 and by["mine"]["seeds"] == [0]
    assert [e["label"] for e in entries] == ["a", "mine", "b"]          # best mean first
    assert "**101.00** | 100.00-102.00" in markdown(entries)
    with pytest.raises(UsageError, match="more than once"):
        aggregate([paths[0], paths[0]])
    with pytest.raises(UsageError, match="not a readable"):
        aggregate([tmp_path / "missing.json"])
