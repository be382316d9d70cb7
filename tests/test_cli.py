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
