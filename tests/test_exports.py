"""Dated exports under a prefix, on a local folder and on S3 (moto on loopback)."""

import io
import json
import logging
import re
from datetime import datetime, timezone

import polars as pl
import pytest

from flytetune import storage
from flytetune.exports import (
    MARKER,
    NO_CUTOFF,
    ExportError,
    copy_export,
    is_export_prefix,
    parse_date,
    pick_export,
)


def parquet(rows: int) -> bytes:
    buffer = io.BytesIO()
    pl.DataFrame({"text": [f"t{i}" for i in range(rows)], "label": ["a"] * rows}).write_parquet(buffer)
    return buffer.getvalue()


def export(prefix: str, dt: str, parts: int = 2, complete: bool = True) -> None:
    for i in range(parts):
        storage.write_bytes(f"{prefix}dt={dt}/part-{i:04d}.parquet", parquet(3 + i))
    if complete:
        storage.write_bytes(f"{prefix}dt={dt}/{MARKER}", b"")


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path) -> str:
    if request.param == "local":
        return f"{tmp_path}/exports/"
    return f"s3://{request.getfixturevalue('s3_bucket')}/transactions/exports/"


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_picks_the_newest_complete_export_at_or_before_the_kickoff(prefix):
    for dt in ("2026-11-09", "2026-11-16", "2026-11-23"):
        export(prefix, dt)
    picked = pick_export(prefix, at=utc(2026, 11, 20, 3))
    assert picked.uri == f"{prefix}dt=2026-11-16/"
    assert picked.date == utc(2026, 11, 16)
    assert picked.files == (f"{prefix}dt=2026-11-16/part-0000.parquet", f"{prefix}dt=2026-11-16/part-0001.parquet")
    assert picked.marker == f"{prefix}dt=2026-11-16/{MARKER}"
    # An export of the kickoff's own day counts (dt= is midnight UTC); no cutoff means the newest.
    assert pick_export(prefix, at=utc(2026, 11, 23, 3)).uri == f"{prefix}dt=2026-11-23/"
    assert pick_export(prefix).uri == f"{prefix}dt=2026-11-23/"


def test_an_incomplete_newer_export_is_skipped_with_a_log_line(prefix, caplog):
    export(prefix, "2026-11-16")
    export(prefix, "2026-11-23", complete=False)
    with caplog.at_level(logging.WARNING, logger="flytetune.exports"):
        picked = pick_export(prefix, at=utc(2026, 11, 30, 3))
    assert picked.uri == f"{prefix}dt=2026-11-16/"
    assert f"{prefix}dt=2026-11-23/: incomplete export (no _SUCCESS), skipped" in caplog.messages


def test_no_export_before_the_kickoff_is_one_line_naming_the_prefix(prefix):
    export(prefix, "2026-11-23")
    export(prefix, "2026-11-16", complete=False)
    with pytest.raises(ExportError) as caught:
        pick_export(prefix, at=utc(2026, 11, 20, 3))
    message = str(caught.value)
    assert message == (f"{prefix}: no complete export (dt=... folder with _SUCCESS) dated at or before "
                       "2026-11-20T03:00:00Z; found dt=2026-11-16 (no _SUCCESS), dt=2026-11-23 (after)")
    assert "\n" not in message


def test_an_empty_prefix_is_one_line_naming_it(prefix):
    with pytest.raises(ExportError, match=r"^.*exports/: no complete export \(dt=\.\.\. folder with _SUCCESS\)$"):
        pick_export(prefix)


def test_timestamps_and_hidden_files(prefix, caplog):
    export(prefix, "2026-11-23T01:00:00Z", parts=1)
    export(prefix, "2026-11-23T05%3A00%3A00Z", parts=1)  # Hive/Spark escape ':' as %3A
    export(prefix, "latest", parts=1)
    storage.write_bytes(f"{prefix}dt=2026-11-23T01:00:00Z/.part-0000.parquet.crc", b"crc")
    storage.write_bytes(f"{prefix}dt=2026-11-23T01:00:00Z/_temporary/0/part-0009.parquet", b"x")
    storage.write_bytes(f"{prefix}README.md", b"not an export")
    with caplog.at_level(logging.WARNING, logger="flytetune.exports"):
        picked = pick_export(prefix, at=utc(2026, 11, 23, 3))
    assert picked.date == utc(2026, 11, 23, 1)
    assert picked.files == (f"{prefix}dt=2026-11-23T01:00:00Z/part-0000.parquet",)
    assert any("dt=latest/: not a date" in m for m in caplog.messages)
    assert pick_export(prefix).date == utc(2026, 11, 23, 5)


def test_a_complete_export_without_data_fails_rather_than_falling_back(prefix):
    export(prefix, "2026-11-16")
    storage.write_bytes(f"{prefix}dt=2026-11-23/{MARKER}", b"")
    with pytest.raises(ExportError, match=r"dt=2026-11-23/: has _SUCCESS but no data files$"):
        pick_export(prefix)


@pytest.mark.parametrize("value, expected", [
    ("2026-11-23", utc(2026, 11, 23)), ("2026-11-23T04:05:06Z", utc(2026, 11, 23, 4, 5, 6)),
    ("2026-11-23T04%3A05%3A06Z", utc(2026, 11, 23, 4, 5, 6)), ("2026-13-01", None), ("2026-11-23 04:05", None),
    ("latest", None),
])
def test_parse_date(value, expected):
    assert parse_date(value) == expected


def test_a_naive_kickoff_is_utc(tmp_path):
    prefix = f"{tmp_path}/exports/"
    export(prefix, "2026-11-23T03:00:00Z", parts=1)
    assert pick_export(prefix, at=datetime(2026, 11, 23, 3)).date == utc(2026, 11, 23, 3)
    assert NO_CUTOFF.year == 9999


def test_a_file_is_not_an_export_prefix(prefix):
    export(prefix, "2026-11-23")
    assert is_export_prefix(prefix)
    assert not is_export_prefix(prefix.rstrip("/"))  # the trailing / is what asks for a prefix
    assert not is_export_prefix(f"{prefix}dt=2026-11-23/part-0000.parquet")
    assert not is_export_prefix(f"{prefix}dt=2026-11-23/")  # one export's folder: no dt= folders below it
    assert not is_export_prefix(prefix.replace("exports/", "nothing-here/"))
    plain = prefix.replace("exports/", "plain/")
    storage.write_bytes(f"{plain}data.parquet", parquet(2))
    assert not is_export_prefix(plain)  # a folder of files, not of dt= folders


def test_copy_export_copies_the_parts_and_returns_lineage(prefix, tmp_path):
    export(prefix, "2026-11-16", parts=3)
    picked = pick_export(prefix)
    record = copy_export(picked, tmp_path / "raw")
    names = ["part-0000.parquet", "part-0001.parquet", "part-0002.parquet"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == names
    assert [pl.read_parquet(tmp_path / "raw" / n).height for n in names] == [3, 4, 5]
    assert record == {"uri": f"{prefix}dt=2026-11-16/", "date": "2026-11-16T00:00:00Z",
                      "marker": f"{prefix}dt=2026-11-16/_SUCCESS",
                      "files": [{"uri": f"{prefix}dt=2026-11-16/{n}", "file": n} for n in names]}
    json.dumps(record)


def test_copy_dataset_on_a_prefix_uses_the_export_and_records_it(prefix, tmp_path):
    """What the copy task does with a prefix: the chosen export's parts as one table, and its lineage."""
    from flytetune.data import copy_dataset, iter_table, load_sources

    export(prefix, "2026-11-16")
    export(prefix, "2026-11-23", parts=3)
    export(prefix, "2026-11-30", complete=False)
    sources = copy_dataset(prefix, tmp_path / "raw", at=utc(2026, 11, 29))
    assert sources == load_sources(tmp_path / "raw")
    record = sources["dataset"]
    assert record["uri"] == prefix and record["export"]["uri"] == f"{prefix}dt=2026-11-23/"
    table = pl.concat(iter_table(tmp_path / "raw" / record["file"], record["uri"]))
    assert table.get_column("text").to_list() == [f"t{i}" for n in (3, 4, 5) for i in range(n)], "parts in name order"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["dataset-parts", "sources.json"]


def test_the_export_is_copied_as_its_parts_never_concatenated(prefix, tmp_path):
    """The copy keeps the export's parts as they are, in a folder prepare streams part by part: no
    step holds the whole export in memory, however many rows it has."""
    from flytetune.data import copy_dataset

    export(prefix, "2026-11-23", parts=3)
    sources = copy_dataset(prefix, tmp_path / "raw")
    folder = tmp_path / "raw" / sources["dataset"]["file"]
    assert folder.is_dir() and sources["dataset"]["file"] == "dataset-parts"
    names = ["part-0000.parquet", "part-0001.parquet", "part-0002.parquet"]
    assert sorted(p.name for p in folder.iterdir()) == names
    # Byte for byte the export's objects: copied, not read and written again.
    for name in names:
        assert (folder / name).read_bytes() == storage.read_bytes(f"{prefix}dt=2026-11-23/{name}")
    assert [f["file"] for f in sources["dataset"]["export"]["files"]] == names


def _write_part(prefix: str, name: str, frame: pl.DataFrame | None = None, data: bytes | None = None) -> None:
    if data is None:
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        data = buffer.getvalue()
    storage.write_bytes(f"{prefix}dt=2026-11-23/{name}", data)


@pytest.mark.parametrize("second, problem", [
    (pl.DataFrame({"text": ["x"], "label": [1]}),
     "column 'label' has type Int64, but String in {first}; the data files of {folder} must share columns and types"),
    (pl.DataFrame({"text": ["x"], "label": ["a"], "extra": [1.0]}),
     "columns (text, label, extra) differ from those of {first} (text, label)"),
    (pl.DataFrame({"body": ["x"], "label": ["a"]}), "columns (body, label) differ from those of {first} (text, label)"),
    (b"not parquet", "cannot be read as parquet"),
    (b"", "file is empty"),
])
def test_a_part_that_does_not_fit_is_refused_in_the_copy_naming_it(prefix, tmp_path, second, problem):
    """Checked on the parts' schemas when they are copied, before prepare reads a row."""
    from flytetune.data import DataError, copy_dataset

    folder = f"{prefix}dt=2026-11-23/"
    _write_part(prefix, "part-0000.parquet", pl.DataFrame({"text": ["a", "b"], "label": ["a", "b"]}))
    if isinstance(second, bytes):
        _write_part(prefix, "part-0001.parquet", data=second)
    else:
        _write_part(prefix, "part-0001.parquet", second)
    storage.write_bytes(f"{folder}{MARKER}", b"")
    expected = f"{folder}part-0001.parquet: " + problem.format(first=f"{folder}part-0000.parquet", folder=folder)
    with pytest.raises(DataError, match=re.escape(expected)):
        copy_dataset(prefix, tmp_path / "raw")


def test_parts_may_differ_in_integer_width_and_all_null_columns(tmp_path):
    """What prepare reads as the same strings: Int32 and Int64 labels, a column all null in one part."""
    from flytetune.data import check_parts

    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pl.DataFrame({"text": ["a"], "label": pl.Series([1], dtype=pl.Int32), "note": ["n"]}).write_parquet(first)
    pl.DataFrame({"text": ["b"], "label": pl.Series([2], dtype=pl.Int64), "note": [None]}).write_parquet(second)
    check_parts([(first, "s3://b/a.parquet"), (second, "s3://b/b.parquet")], "s3://b/")
