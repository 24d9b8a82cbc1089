import pytest

from csulora.errors import InputError
from csulora.io.jsonl import read_jsonl, write_jsonl


def test_round_trip_keeps_unicode_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "héllo"}, {"prompt": "b"}])
    assert "héllo" in path.read_text(encoding="utf-8")
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert read_jsonl(path) == [(1, {"prompt": "héllo"}), (2, {"prompt": "b"})]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": 1}\n{broken\n', r"bad\.jsonl:2: not valid JSON"),
        ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_jsonl(path)


def test_missing_file_names_what_was_expected(tmp_path):
    with pytest.raises(InputError, match="no such task file"):
        read_jsonl(tmp_path / "nope.jsonl", what="task file")


def test_records_without_line_numbers_round_trip(tmp_path):
    from csulora.io.jsonl import read_jsonl_records

    records = [{"prompt": "a", "response": "b"}, {"prompt": "é", "response": ""}]
    assert read_jsonl_records(write_jsonl(tmp_path / "x.jsonl", records)) == records
