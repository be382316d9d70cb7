from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

from clipcid.cli import main


def test_bad_input_gives_one_line_error(tmp_path, capsys):
    code = main(
        [
            "embed",
            "--data",
            str(tmp_path / "nothing" / "{00000..00002}.tar"),
            "--model",
            "clipcid-tiny",
            "--out",
            str(tmp_path / "emb"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("clipcid: error: shard not found:") and "3 of 3 missing" in err[-1]
    assert not (tmp_path / "emb").exists()


def test_unknown_model_error(tmp_path, capsys, shards):
    folder, _ = shards
    code = main(["embed", "--data", str(folder), "--model", "ViT-Q-99", "--out", str(tmp_path / "emb")])
    assert code == 2 and "unknown model architecture 'ViT-Q-99'" in capsys.readouterr().err


def test_module_entry_point_lists_models():
    result = subprocess.run(
        [sys.executable, "-m", "clipcid", "models"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert "clipcid-tiny" in result.stdout and "clipcid-small" in result.stdout


def test_help_says_what_clipcid_does(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "clipcid makes small CLIP models learn from large ones" in out and "clipcid run" in out
    assert "a table of command" not in out


def test_numbers_are_checked_on_entry_with_one_line(tmp_path, capsys, shards):
    folder, _ = shards
    base = ["distill", "--data", str(folder), "--model", "clipcid-tiny", "--out", str(tmp_path / "run")]
    for flag, value, expected in (
        ("--lr", "-1", "--lr must be a number above 0, not -1.0"),
        ("--wd", "nan", "--wd must be a number at least 0, not nan"),
        ("--batch-size", "0", "--batch-size must be a number at least 1, not 0"),
        ("--max-steps", "0", "--max-steps must be a number at least 1, not 0"),
    ):
        assert main([*base, flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"clipcid: error: {expected}"]
    assert not (tmp_path / "run").exists()
    assert main(["cluster", "--emb", str(tmp_path), "--out", str(tmp_path / "c"), "--niter", "0"]) == 2
    assert "--niter must be a number at least 1" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    import clipcid.holdout

    def broken(cfg):
        raise ValueError("Invalid learning rate: -1\nwith a second line")

    monkeypatch.setattr(clipcid.holdout, "hold_out", broken)
    assert main(["holdout", "--data", str(tmp_path), "--out", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "clipcid: error: unexpected ValueError: Invalid learning rate: -1 (run with --debug for the traceback)"
    ]
