import polars as pl

from flytetune.sample.generate import CATEGORIES, DEFAULT_PATH, generate, main


def test_generator_is_deterministic():
    assert generate(500, seed=3).equals(generate(500, seed=3))
    assert not generate(500, seed=3).equals(generate(500, seed=4))


def test_bundled_file_is_the_generator_output():
    assert pl.read_parquet(DEFAULT_PATH).equals(generate())


def test_shape_and_balance():
    df = generate()
    counts = dict(df.group_by("label").len().iter_rows())
    assert df.height == 4000 and df.columns == ["text", "label"]
    assert len(counts) == len(CATEGORIES) >= 12
    assert min(counts.values()) >= 100
    assert df.filter(pl.col("text").str.strip_chars() == "").height == 0
    assert df.height - df.unique().height < 0.05 * df.height


def test_noise_makes_some_texts_ambiguous():
    df = generate()
    ambiguous = df.filter(pl.col("label").n_unique().over("text") > 1)
    assert ambiguous.height > 0, "some identical texts carry different labels"


def test_cli_writes_parquet(tmp_path, capsys):
    assert main(["--rows", "200", "--seed", "1", "--out", str(tmp_path / "s.parquet")]) == 0
    assert pl.read_parquet(tmp_path / "s.parquet").equals(generate(200, seed=1))
    assert "wrote 200 rows" in capsys.readouterr().out
