"""util/fileio: one reader for every JSON file a user hands in (recipes, plans, layouts)."""

from __future__ import annotations

import pytest

from clipcid.errors import ClipcidError
from clipcid.util.fileio import read_user_json


def test_a_user_json_file_is_an_object_or_one_line_says_what_is_wrong(tmp_path):
    good = tmp_path / "plan.json"
    good.write_text('{"seeds": [0, 1]}')
    assert read_user_json(good, "study plan") == {"seeds": [0, 1]}
    with pytest.raises(ClipcidError, match=r"^study plan .*missing.json: file not found$"):
        read_user_json(tmp_path / "missing.json", "study plan")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ClipcidError, match=r"^--layout .*bad.json is not valid JSON: Expecting property name"):
        read_user_json(tmp_path / "bad.json", "--layout")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ClipcidError, match="--recipe .*list.json: expected a JSON object, found a list"):
        read_user_json(tmp_path / "list.json", "--recipe")
