import os
import stat

import pytest

from veil.cli_common import parse_options
from veil.io import write_json


def test_parse_options_values_and_refusals():
    assert parse_options(["k=3", "name=adaptive", "w=0.5", "flag=true"]) == {"k": 3, "name": "adaptive", "w": 0.5, "flag": True}
    for bad, words in ((["w=NaN"], "finite"), (["w=Infinity"], "finite"), (["w=-Infinity"], "finite"), (["=3"], "non-empty KEY"),
                       (["k=1", "k=2"], "twice"), (["k"], "KEY=VALUE")):
        with pytest.raises(ValueError, match=words):
            parse_options(bad)


def test_result_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_append_jsonl_adds_whole_lines(tmp_path):
    import json

    from veil.io import append_jsonl

    path = tmp_path / "sub" / "r.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"b": [1, 2]})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": [1, 2]}]
