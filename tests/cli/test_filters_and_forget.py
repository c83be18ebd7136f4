"""`--path-glob`, `--min-score` and `prvr forget`."""
import json

from prvr_cli.errors import ExitCode


def _paths(out: str) -> list[str]:
    return [h["path"] for h in json.loads(out)["results"]]


def test_path_glob_filters_before_the_top_k_and_min_score_after(cli, videos):
    assert cli.ingest(videos)[0] == 0
    code, out, _ = cli("search", "a red screen", "-k", "10", "--json")
    everything = json.loads(out)["results"]
    code, out, err = cli("search", "a red screen", "-k", "1", "--json", "--path-glob", "*/sub/*")
    assert code == 0 and _paths(out) == [str(videos.resolve() / "sub" / "yellow_magenta.avi")], err
    code, out, _ = cli("search", "a red screen", "-k", "10", "--json", "--path-glob", "*.mp4")
    assert _paths(out) == [h["path"] for h in everything if h["path"].endswith(".mp4")]
    floor = everything[1]["score"] - 1e-5            # the JSON rounds scores to 6 decimals
    code, out, _ = cli("search", "a red screen", "-k", "10", "--json", "--min-score", str(floor))
    assert _paths(out) == [h["path"] for h in everything if h["score"] >= floor] and len(_paths(out)) == 2
    code, out, _ = cli("search", "a red screen", "--paths-only", "--path-glob", "*nothing*")
    assert code == 0 and out == ""


def test_forget_drops_files_and_folders_and_names_what_it_did_not_find(cli, videos, tmp_path):
    assert cli.ingest(videos)[0] == 0
    (videos / "blue.mp4").unlink()                       # gone from disk: still forgettable by its path
    code, out, err = cli("forget", videos / "blue.mp4", videos / "sub")
    assert code == 0 and sorted(out.splitlines()) == sorted([str(videos.resolve() / "blue.mp4"),
                                                             str(videos.resolve() / "sub" / "yellow_magenta.avi")])
    code, out, _ = cli("list")
    assert len(out.splitlines()) == 2
    code, out, err = cli("forget", tmp_path / "nowhere.mp4")
    assert code == ExitCode.USAGE and "not in the index" in err and "nowhere.mp4" in err
    code, out, _ = cli("search", "blue", "--paths-only", "-k", "10")
    assert len(out.splitlines()) == 2 and "blue.mp4" not in out
