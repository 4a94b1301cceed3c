"""File and hub readers: formats, and user errors that name the file, line and field."""

from __future__ import annotations

import sys

import pytest

from tactful.data.readers import Row, convert, detect_format, parse_bool, read_any, read_hub, read_rows
from tactful.data.registry import get_benchmark
from tactful.errors import UserError


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_rows_carry_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "n": 2}\n')
    rows = read_rows(f)
    assert [r.data for r in rows] == [{"prompt": "a"}, {"prompt": "b", "n": 2}]
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3"]  # blank lines are skipped but counted


def test_ndjson_and_compound_suffix(tmp_path):
    assert detect_format(tmp_path / "x.ndjson") == "jsonl"
    assert detect_format(tmp_path / "x.v2.csv") == "csv"
    with pytest.raises(UserError, match="cannot tell the format"):
        read_rows(write(tmp_path / "x.txt", "hello\n"))


def test_json_list_wrapper_and_strings(tmp_path):
    rows = read_rows(write(tmp_path / "a.json", '[{"prompt": "a"}, {"prompt": "b"}]'))
    assert [r.get("prompt") for r in rows] == ["a", "b"] and rows[1].where.endswith("a.json[1]")
    rows = read_rows(write(tmp_path / "b.json", '{"data": [{"prompt": "x"}], "version": 1}'))
    assert [r.data for r in rows] == [{"prompt": "x"}]
    rows = read_rows(write(tmp_path / "c.json", '["just a prompt"]'))
    assert rows[0].data == {"prompt": "just a prompt"}
    with pytest.raises(UserError, match=r"item 1 is a int"):
        read_rows(write(tmp_path / "d.json", '[{"prompt": "a"}, 3]'))
    with pytest.raises(UserError, match=r"e\.json:2: malformed JSON"):
        read_rows(write(tmp_path / "e.json", '[\n{"prompt": }\n]'))


def test_csv_rows_quoting_and_lines(tmp_path):
    f = write(tmp_path / "d.csv", 'goal,target\n"a, with comma","say ""hi"""\nplain,text\n')
    rows = read_rows(f)
    assert rows[0].data == {"goal": "a, with comma", "target": 'say "hi"'}
    assert [r.where for r in rows] == [f"{f}:2", f"{f}:3"]
    # a pandas-written index column has an empty header
    rows = read_rows(write(tmp_path / "p.csv", ",prompt\n0,hello\n"))
    assert rows[0].data == {"_index": "0", "prompt": "hello"}


def test_csv_row_with_too_many_values(tmp_path):
    f = write(tmp_path / "d.csv", "a,b\n1,2\n1,2,3\n")
    with pytest.raises(UserError, match=r"d\.csv:3: row has more values"):
        read_rows(f)


def test_parquet_round_trip_or_clear_error(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the no-pyarrow error is tested below")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "label": ["harmful", "benign"]}), f)
    rows = read_rows(f)
    assert [r.data for r in rows] == [{"prompt": "a", "label": "harmful"}, {"prompt": "b", "label": "benign"}]
    assert rows[1].where == f"{f}#1"
    with pytest.raises(UserError, match="cannot read Parquet"):
        read_rows(write(tmp_path / "bad.parquet", "not parquet"))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    f = write(tmp_path / "d.parquet", "whatever")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="needs pyarrow: pip install pyarrow"):
        read_rows(f)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: malformed JSON"):
        read_rows(f)
    f = write(tmp_path / "e.jsonl", '{"prompt": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(UserError, match=r"e\.jsonl:2: expected a JSON object per line, got list"):
        read_rows(f)


def test_missing_column_names_file_line_and_field(tmp_path):
    f = write(tmp_path / "d.csv", "goal,target\nsomething,else\n")
    (row,) = read_rows(f)
    assert row.require("goal") == "something"
    with pytest.raises(UserError, match=r"d\.csv:2: missing field 'prompt' \(fields present: goal, target\)"):
        row.require("prompt")
    with pytest.raises(UserError, match=r"x:1: missing field 'a'"):
        Row({"a": None}, "x:1").require("a")  # null counts as missing


def test_unknown_benchmark_name_suggests():
    with pytest.raises(UserError, match=r"unknown benchmark 'strongrejct'.*did you mean 'strongreject'"):
        get_benchmark("strongrejct")
    with pytest.raises(UserError, match="known benchmarks:"):
        get_benchmark("zzzzzz")


@pytest.mark.parametrize("name, text", [
    ("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("e.json", ""), ("l.json", "[]"), ("e.csv", ""), ("h.csv", "a,b\n"),
])
def test_empty_file_is_a_user_error(tmp_path, name, text):
    with pytest.raises(UserError, match="is empty"):
        read_rows(write(tmp_path / name, text))


def test_missing_file_directory_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        read_rows(tmp_path)
    with pytest.raises(UserError, match="unknown data format 'xml'"):
        read_rows(write(tmp_path / "d.jsonl", '{"a": 1}\n'), fmt="xml")


def test_read_any_prefers_a_local_file(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n')
    assert read_any(f)[0].data == {"prompt": "a"}
    with pytest.raises(UserError, match="does not exist"):
        read_any(str(tmp_path / "missing.csv"))  # a file name is not mistaken for a hub id


def test_read_hub_failures_are_user_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load dataset 'org/set' \(split 'test'\): no network here"):
        read_hub("org/set", split="test")


def test_read_hub_rows_name_the_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = {}

    def fake(dataset_id, name, split, data_files):
        calls.update(id=dataset_id, name=name, split=split)
        return [{"prompt": "a"}, {"prompt": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = read_hub("org/set", split="test", name="cfg")
    assert calls == {"id": "org/set", "name": "cfg", "split": "test"}
    assert rows[1].where == "org/set[test]#1" and rows[1].data == {"prompt": "b"}


def test_parse_bool_and_convert():
    row = Row({}, "f:1")
    assert [parse_bool(v, row, "x") for v in (True, 0, 1, "true", "False", "yes", "0")] == [
        True, False, True, True, False, True, False]
    with pytest.raises(UserError, match=r"f:1: field 'x' should be true/false"):
        parse_bool("maybe", row, "x")
    rows = [Row({"v": i}, f"f:{i}") for i in range(4)]
    assert convert(rows, lambda r: r.get("v") if r.get("v") % 2 else None) == [1, 3]


def test_csv_unterminated_quote_names_the_line_it_opens_on(tmp_path):
    f = write(tmp_path / "d.csv", 'prompt,label\nhello,a\n"broken,b\nthird,c\nfourth,d\n')
    with pytest.raises(UserError, match=r"d\.csv:3: unterminated quoted field"):
        read_rows(f)
    # quoted fields that span lines and close properly are still fine
    rows = read_rows(write(tmp_path / "ok.csv", 'prompt,label\n"two\nlines",a\n'))
    assert rows[0].data == {"prompt": "two\nlines", "label": "a"}


def test_csv_with_a_utf8_byte_order_mark_keeps_its_first_column(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufeffgoal,target\nx,y\n".encode("utf-8"))
    assert read_rows(f)[0].data == {"goal": "x", "target": "y"}


def test_utf16_with_a_byte_order_mark_is_decoded(tmp_path):
    f = tmp_path / "u16.jsonl"
    f.write_bytes('{"prompt": "héllo"}\n'.encode("utf-16"))  # Python writes a BOM
    assert read_rows(f)[0].data == {"prompt": "héllo"}


@pytest.mark.parametrize("name,data,msg", [
    ("bin.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"bin\.jsonl is a binary file"),
    ("u16.csv", "prompt\nhi\n".encode("utf-16-le"), r"u16\.csv looks like UTF-16 text without a byte-order mark"),
    ("latin1.json", '[{"prompt": "ok"},\n {"prompt": "caf\xe9"}]'.encode("latin-1"), r"latin1\.json:2: .*not UTF-8"),
])
def test_files_that_are_not_utf8_text_are_user_errors(tmp_path, name, data, msg):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=msg):
        read_rows(tmp_path / name)


def test_gzip_data_files_are_read_as_their_text(tmp_path):
    import gzip

    from tactful.data.readers import read_rows

    path = tmp_path / "items.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [r.data["prompt"] for r in read_rows(path)] == ["a", "b"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"prompt": "a"}\nnot json\n')
    with pytest.raises(UserError, match=r"items.jsonl.gz:2"):
        read_rows(path)
    path.write_bytes(gzip.compress(b'{"prompt": "a"}\n')[:12])  # cut short
    with pytest.raises(UserError, match="not a readable gzip file"):
        read_rows(path)
