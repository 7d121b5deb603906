import logging
import re

import polars as pl
import pytest

from flytetune.config import ConfigError, DataConfig, FinetuneConfig
from flytetune.data import LABEL, TEXT, DataError, copy_dataset, read_table, stratified_split, subsample, validate

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


def prepare_csv(tmp_path, df, cfg=None, test_df=None):
    """Run prepare on `df` written as CSV (and `test_df` as the test file); returns the meta."""
    from flytetune.config import FinetuneConfig
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare

    df.write_csv(tmp_path / "d.csv")
    test_uri = None
    if test_df is not None:
        test_df.write_csv(tmp_path / "t.csv")
        test_uri = str(tmp_path / "t.csv")
    copy_dataset(str(tmp_path / "d.csv"), tmp_path / "raw", test_uri=test_uri)
    return prepare(tmp_path / "raw", tmp_path / "prepared", cfg or FinetuneConfig())


def test_single_class_is_refused_before_training(tmp_path):
    with pytest.raises(DataError, match=r"d.csv: label column 'label' has only class 'a'; a classifier needs at "
                                        r"least two classes$"):
        prepare_csv(tmp_path, frame(classes=("a",)))
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([0.1, 0.2, 0.3], "Float64"),
        ([{"c": "clothing"}, {"c": "food"}, {"c": "rent"}], "Struct"),
        ([["clothing"], ["food"], ["rent"]], "List(String)"),
    ],
    ids=["float", "struct", "list"],
)
def test_label_column_of_other_types_is_refused(values, dtype):
    df = pl.DataFrame({"text": [f"t{i}" for i in range(9)], "label": [values[i % 3] for i in range(9)]})
    with pytest.raises(DataError, match=rf"^src: label column 'label' has type {re.escape(dtype)}.*; it must hold "
                                        r"strings, integers or booleans \(set data.label_column or convert"):
        validate(df, "src", CFG)


def test_label_types_read_from_files_are_refused(tmp_path):
    # Struct and list labels as they come out of JSON lines, through read_table: one line, no polars traceback.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "t{i}", "label": ["x{i % 3}"]}}\n' for i in range(9)))
    with pytest.raises(DataError, match=r"d.jsonl: label column 'label' has type List\(String\)"):
        validate(read_table(path), str(path), CFG)


def test_boolean_and_categorical_labels_become_strings():
    df = pl.DataFrame({"text": [f"t{i}" for i in range(9)], "label": [i % 2 == 0 for i in range(9)]})
    assert validate(df, "src", CFG).get_column(LABEL).unique().sort().to_list() == ["false", "true"]
    df = df.with_columns(pl.Series("label", ["x", "y", "z"] * 3, dtype=pl.Categorical),
                         pl.col("text").cast(pl.Enum([f"t{i}" for i in range(9)])))
    out = validate(df, "src", CFG)
    assert out.schema[TEXT] == pl.String and out.get_column(LABEL).to_list()[:3] == ["x", "y", "z"]


@pytest.mark.parametrize(("values", "dtype"), [(list(range(30)), "Int64"), ([["a", "b"]] * 30, "List(String)")],
                         ids=["numbers", "lists"])
def test_text_column_of_other_types_is_refused(values, dtype):
    df = pl.DataFrame({"text": values, "label": ["a", "b", "c"] * 10})
    with pytest.raises(DataError, match=rf"^src: text column 'text' has type {re.escape(dtype)}; it must hold "
                                        r"text \(strings\)"):
        validate(df, "src", CFG)


def test_max_rows_is_an_upper_bound_with_many_classes():
    # One large class and 100 of 5 rows: the old "at least 3 per class" rule kept 700 rows for max_rows=600.
    classes = tuple(f"c{i:03d}" for i in range(100))
    df = validate(pl.concat([frame(n_per_class=1000, classes=("big",)), frame(n_per_class=5, classes=classes)]),
                  "src", CFG)
    cfg = DataConfig(max_rows=600, min_examples_per_class=3)
    out = subsample(df, cfg, "src")
    counts = dict(out.group_by(LABEL).len().iter_rows())
    assert out.height == 600 and len(counts) == 101 and min(counts.values()) == 3 and counts["big"] == 300
    assert out.equals(subsample(df, cfg, "src")), "deterministic"


def test_max_rows_keeps_class_shares():
    df = validate(pl.concat([frame(n_per_class=100, classes=("a",)), frame(n_per_class=20, classes=("b", "c"))]),
                  "src", CFG)
    out = subsample(df, DataConfig(max_rows=70, min_examples_per_class=5), "src")
    assert dict(out.group_by(LABEL).len().sort(LABEL).iter_rows()) == {"a": 50, "b": 10, "c": 10}


def test_max_rows_too_small_for_the_classes():
    df = validate(frame(n_per_class=10, classes=tuple(f"c{i}" for i in range(100))), "src", CFG)
    with pytest.raises(DataError, match=r"^src: data.max_rows=400 is too small for 100 classes with "
                                        r"data.min_examples_per_class=5 \(needs at least 500\)"):
        subsample(df, DataConfig(max_rows=400, min_examples_per_class=5), "src")


def test_test_fraction_zero_needs_a_test_file(tmp_path):
    cfg = FinetuneConfig(data=DataConfig(test_fraction=0.0))
    with pytest.raises(ConfigError, match=r"^data.test_fraction: is 0 but no test file was given"):
        prepare_csv(tmp_path, frame(), cfg)


def test_test_fraction_zero_with_a_test_file(tmp_path):
    cfg = FinetuneConfig(data=DataConfig(test_fraction=0.0, min_examples_per_class=3))
    meta = prepare_csv(tmp_path, frame(), cfg, test_df=frame(n_per_class=2).with_columns(pl.col("text") + " t"))
    assert meta["rows"] == {"train": 27, "validation": 3, "test": 6}


def test_every_split_must_be_non_empty(tmp_path):
    # 4 rows a class: 2 to validation (0.5), 2 to test (round(1.56)), none left for training.
    cfg = FinetuneConfig(data=DataConfig(validation_fraction=0.5, test_fraction=0.39, min_examples_per_class=3))
    with pytest.raises(DataError, match=r"d.csv: the train split is empty; check data.test_fraction"):
        prepare_csv(tmp_path, frame(n_per_class=4), cfg)
    assert not (tmp_path / "prepared").exists(), "fails before the tokenizer writes anything"


def test_empty_dataset_uri(tmp_path):
    with pytest.raises(DataError,
                       match=r"^dataset_uri is empty; give a CSV, parquet, JSON lines or text lines \(\.txt\) file$"):
        copy_dataset("", tmp_path)
    assert not (tmp_path / "sources.json").exists()


@pytest.mark.parametrize("name", ["data.parquet", "data"])
def test_directory_as_dataset(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match=rf"{name}: is a directory; dataset_uri must name a CSV, parquet, "
                                        r"JSON lines or text lines \(\.txt\) file$"):
        copy_dataset(str(folder), tmp_path / "raw")
    with pytest.raises(DataError, match=rf"{name}: is a directory; test_uri must name"):
        frame().write_csv(tmp_path / "d.csv")
        copy_dataset(str(tmp_path / "d.csv"), tmp_path / "raw", test_uri=str(folder))


# Plain text lines (.txt): unlabelled text, one text per line, read into the configured text column.

def test_text_lines_are_one_column_without_blank_lines(tmp_path):
    from flytetune.data import iter_table

    path = tmp_path / "corpus.txt"
    # A byte-order mark, Windows line ends, blank and whitespace-only lines, no final line break.
    path.write_bytes("\ufefffirst text\r\n\r\n  second, with \"quotes\"\tand a tab \n   \nthird".encode())
    expected = ["first text", "  second, with \"quotes\"\tand a tab ", "third"]
    assert read_table(path, text_column="body").to_dict(as_series=False) == {"body": expected}
    chunks = list(iter_table(path, "s3://b/corpus.txt", chunk_rows=2, text_column="body"))
    assert [c.height for c in chunks] == [2, 1] and all(c.columns == ["body"] for c in chunks)
    assert pl.concat(chunks).get_column("body").to_list() == expected


def test_text_lines_across_parts_stream_in_name_order(tmp_path):
    from flytetune.data import iter_table

    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-0001.txt").write_text("c\nd\n")
    (folder / "part-0000.txt").write_text("a\n\nb\n")
    chunks = list(iter_table(folder, "s3://b/export/", chunk_rows=10))
    assert [c.get_column(TEXT).to_list() for c in chunks] == [["a", "b"], ["c", "d"]]


def test_non_utf8_text_lines_are_refused_naming_the_file(tmp_path):
    from flytetune.data import iter_table

    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    problem = r"s3://b/latin1.txt: not valid UTF-8 at byte 6 \(line 2\): b'\\xe9 cr'; re-encode the file as UTF-8"
    with pytest.raises(DataError, match=problem):
        list(iter_table(path, "s3://b/latin1.txt"))
    with pytest.raises(DataError, match=problem):
        read_table(path, "s3://b/latin1.txt")


def test_only_blank_lines_is_no_data(tmp_path):
    from flytetune.data import iter_table

    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"blank.txt: has only blank lines"):
        list(iter_table(path))


def test_a_txt_dataset_is_located_and_copied(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\n")
    sources = copy_dataset(str(path), tmp_path / "raw")
    assert sources == {"dataset": {"uri": str(path), "file": "dataset.txt"}}
    assert (tmp_path / "raw" / "dataset.txt").read_text() == "one\ntwo\n"


def test_a_non_utf8_txt_part_of_an_export_is_refused_in_the_copy_naming_it(tmp_path):
    folder = tmp_path / "exports" / "dt=2026-11-23"
    folder.mkdir(parents=True)
    (folder / "part-0000.txt").write_text("fine\n")
    (folder / "part-0001.txt").write_bytes(b"caf\xe9\n")
    (folder / "_SUCCESS").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{folder}/part-0001.txt: not valid UTF-8 at byte 3 (line 1)")):
        copy_dataset(f"{tmp_path}/exports/", tmp_path / "raw")
