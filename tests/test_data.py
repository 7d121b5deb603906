import logging

import polars as pl
import pytest

from flytetune.config import DataConfig
from flytetune.data import LABEL, TEXT, DataError, read_table, stratified_split, validate

CFG = DataConfig(min_examples_per_class=3)


def frame(n_per_class=10, classes=("a", "b", "c")):
    return pl.DataFrame(
        {"text": [f"{c} text {i}" for c in classes for i in range(n_per_class)],
         "label": [c for c in classes for _ in range(n_per_class)]}
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_reads_every_format(tmp_path, suffix):
    df = frame()
    path = tmp_path / f"d{suffix}"
    {".csv": df.write_csv, ".parquet": df.write_parquet, ".jsonl": df.write_ndjson}[suffix](path)
    assert read_table(path).equals(df)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: no such file"):
        read_table(tmp_path / "nope.csv")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.csv: file is empty"):
        read_table(path)


def test_header_only(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match=r"header.csv: has a header but no rows"):
        read_table(path)


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,a\ncaf\u00e9 cr\u00e8me,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: not valid UTF-8 at byte \d+ \(line 3\)"):
        read_table(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"d.xlsx: unsupported file type '.xlsx'"):
        read_table(path)


def test_missing_column_lists_columns():
    df = frame().rename({"label": "category"})
    with pytest.raises(DataError, match=r"src.csv: label column 'label' not found \(columns: text, category\); "
                                        r"set data.label_column"):
        validate(df, "src.csv", CFG)


def test_configured_column_names():
    df = frame().rename({"text": "description", "label": "category"})
    out = validate(df, "src", DataConfig(text_column="description", label_column="category",
                                         min_examples_per_class=3))
    assert out.columns[1:] == [TEXT, LABEL] and out.height == 30


def test_null_and_empty_texts_name_rows():
    df = frame().with_columns(
        pl.when(pl.int_range(pl.len()).is_in([3, 7])).then(pl.lit("  ")).otherwise(pl.col("text")).alias("text")
    )
    with pytest.raises(DataError, match=r"src: column 'text' has 2 null or empty value\(s\), e.g. row\(s\) 4, 8"):
        validate(df, "src", CFG)


def test_null_labels_name_rows():
    df = frame().with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("label")).alias("label")
    )
    with pytest.raises(DataError, match=r"column 'label' has 1 null or empty label\(s\), e.g. row\(s\) 1"):
        validate(df, "src", CFG)


def test_class_with_single_example():
    df = pl.concat([frame(), pl.DataFrame({"text": ["lonely"], "label": ["z"]})])
    with pytest.raises(DataError, match=r"src: column 'label': class 'z' has 1 example\(s\), fewer than "
                                        r"data.min_examples_per_class=3; e.g. row\(s\) 31"):
        validate(df, "src", CFG)


def test_text_column_must_be_text():
    df = pl.DataFrame({"text": list(range(30)), "label": ["a"] * 30})
    with pytest.raises(DataError, match="column 'text' must hold text"):
        validate(df, "src", CFG)


def test_exact_duplicates_dropped_with_warning(caplog):
    df = pl.concat([frame(), frame().head(4)])
    with caplog.at_level(logging.WARNING):
        out = validate(df, "src", CFG)
    assert out.height == 30
    assert "dropped 4 exact duplicate row(s)" in caplog.text


def test_integer_labels_become_strings():
    df = pl.DataFrame({"text": [f"t{i}" for i in range(9)], "label": [i % 3 for i in range(9)]})
    assert validate(df, "src", CFG).get_column(LABEL).to_list()[:3] == ["0", "1", "2"]


def test_split_is_stratified_disjoint_and_deterministic():
    df = validate(frame(n_per_class=40, classes=tuple("abcdefg")), "src", CFG)
    train, val, test = stratified_split(df, [0.1, 0.2], seed=3)
    ids = [set(p.get_column("__row").to_list()) for p in (train, val, test)]
    assert set.union(*ids) == set(df.get_column("__row").to_list())
    assert sum(len(i) for i in ids) == df.height
    for part, n in ((val, 4), (test, 8), (train, 28)):
        assert part.group_by(LABEL).len().get_column("len").to_list() == [n] * 7
    again = stratified_split(df.reverse(), [0.1, 0.2], seed=3)
    assert all(a.equals(b) for a, b in zip((train, val, test), again, strict=True)), "row order must not matter"
    other = stratified_split(df, [0.1, 0.2], seed=4)
    assert not other[2].equals(test)


def test_split_keeps_every_class_in_every_part():
    df = validate(frame(n_per_class=5), "src", CFG)
    for part in stratified_split(df, [0.1, 0.1], seed=0):
        assert sorted(part.get_column(LABEL).unique().to_list()) == ["a", "b", "c"]
