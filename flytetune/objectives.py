"""What training optimises: the parts of a run that differ between fine-tuning a classifier and
continuing a backbone's masked-language-model pretraining. Everything else (data loading, precision,
checkpoints, preemption, progress, best-model selection) is the one loop in `flytetune.train.fit`.

An objective builds the model, turns a batch from the loader into the model's inputs, validates, and
saves the model folder. `train.objective` in the config chooses it (`for_run`).
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from flytetune import distributed
from flytetune.backbone import resolve_backbone
from flytetune.config import ConfigError, FinetuneConfig
from flytetune.evaluate import classification_metrics, predict_logits
from flytetune.store import FeatureStore

log = logging.getLogger(__name__)


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    # The load report lists the new head as "missing", which is the point of fine-tuning (and of a
    # backbone shipped without its pretraining head).
    hf_logging.set_verbosity_error()


def _save_common(model, tokenizer, output_dir: Path, cfg: FinetuneConfig, history: dict) -> None:
    """Weights (safetensors), tokenizer, config and training history, into a fresh `output_dir`."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "finetune_config.yaml").write_text(cfg.to_yaml())
    (output_dir / "train_history.json").write_text(json.dumps(history, indent=2) + "\n")


class Classification:
    """A sequence classifier on labelled data: one row of the head per label."""

    name = "classification"

    def __init__(self, labels: list[str]):
        self.labels = labels

    def compat(self) -> dict:
        return {}

    def build_model(self, cfg: FinetuneConfig, init_from: Path | None = None) -> torch.nn.Module:
        """`cfg.model.backbone` with a new head, or the published model `init_from` (a local folder),
        whose head rows are kept by label name where the labels differ."""
        return build_classifier(cfg, self.labels, init_from)

    def inputs(self, batch: dict, step: int, rank: int) -> dict:
        return batch

    def for_training(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def validate(self, model, store: FeatureStore, batch_size: int, pad_id: int,
                 world: distributed.World | None = None, autocast: torch.dtype | None = None) -> dict:
        """Validation loss, accuracy and macro-F1; under torchrun each process predicts every world-th
        example and the predictions are gathered, so validating takes 1/world of the time."""
        world = world or distributed.World()
        indices = np.arange(world.rank, len(store), world.size)
        logits = torch.from_numpy(predict_logits(model, store, batch_size, pad_id, indices, autocast))
        y_true = torch.from_numpy(store.labels()[indices])
        nll = torch.nn.functional.cross_entropy(logits, y_true, reduction="none").numpy()
        parts = distributed.from_all(world, (indices, logits.argmax(dim=1).numpy(), nll))
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
        predicted, losses = (np.concatenate([p[k] for p in parts])[order] for k in (1, 2))
        metrics = classification_metrics(store.labels(), predicted, self.labels)
        return {"loss": float(losses.astype(np.float64).mean()), "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"]}

    def save(self, model, tokenizer, output_dir: Path, cfg: FinetuneConfig, history: dict) -> None:
        """The model folder plus its label map."""
        _save_common(model, tokenizer, output_dir, cfg, history)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        (output_dir / "label_map.json").write_text(json.dumps({"labels": labels}, indent=2) + "\n")


def build_classifier(cfg: FinetuneConfig, labels: list[str], init_from: Path | None = None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_loading()
    label_config = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {label: i for i, label in enumerate(labels)}}
    if init_from is None:
        backbone = resolve_backbone(cfg.model.backbone)
        # A backbone may be a fine-tuned classifier (a published run): its encoder is the point, its head
        # is another task's, loaded only to be replaced (of another size, transformers needs telling).
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone, **label_config, ignore_mismatched_sizes=True, local_files_only=True)
        if any(a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(
                backbone, local_files_only=True).architectures or []):
            _, head = _classifier(model)
            torch.nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
            torch.nn.init.zeros_(head.bias)
        return model
    init = AutoModelForSequenceClassification.from_pretrained(init_from, local_files_only=True)
    init_labels = [init.config.id2label[i] for i in range(init.config.num_labels)]
    if init_labels == labels:
        return init
    # Other labels, or the same in another order: a fresh head whose rows are taken by name, never by index.
    model = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(init_from, **label_config, local_files_only=True))
    name, head = _classifier(model)
    init_rows = {label: i for i, label in enumerate(init_labels)}
    kept = [(i, init_rows[label]) for i, label in enumerate(labels) if label in init_rows]
    state = init.state_dict()
    for key, fresh in head.state_dict().items():
        rows = fresh.clone()
        rows[[i for i, _ in kept]] = state[f"{name}.{key}"][[j for _, j in kept]].to(rows.dtype)
        state[f"{name}.{key}"] = rows
    model.load_state_dict(state)
    log.info("init_from %s has other labels: head rows of %d shared labels copied by name; added %s; removed %s",
             init_from, len(kept), sorted(set(labels) - init_rows.keys()) or "none",
             sorted(init_rows.keys() - set(labels)) or "none")
    return model


def _classifier(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """The final Linear, one output row per label (`classifier` in BERT-like models), and its name."""
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    if head.out_features != model.config.num_labels:
        raise ConfigError(f"init_from: {type(model).__name__} has no final Linear with one row per label")
    return name, head


# Validation masks come from this seed and the batch's first example, the same at every evaluation:
# validation losses of one run compare like with like.
_VALIDATION_SEED = 20_170_612


class _MaskedPositions(torch.nn.Module):
    """A masked-LM model whose head runs only where a token is predicted (about 15% of the positions):
    the vocabulary projection (30,522 x 384 for MiniLM) costs about as much as the whole encoder when it
    runs over every position. The same parameters; the loss of the full forward."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        return self.head(hidden[where])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        where = labels != -100
        logits = self.logits(input_ids, attention_mask, where)
        return _Output(torch.nn.functional.cross_entropy(logits.float(), labels[where]))


class _Output(tuple):
    """What train_step reads of a model's output: `.loss`."""

    def __new__(cls, loss: torch.Tensor):
        return super().__new__(cls, (loss,))

    @property
    def loss(self) -> torch.Tensor:
        return self[0]


class MaskedLM:
    """Continued masked-language-model pretraining of the backbone on unlabelled text (BERT's recipe:
    `train.mlm_probability` of the non-special tokens are predicted; of those 80% are replaced by the
    mask token, 10% by a random token, 10% left as they are).

    Masks are drawn from a generator seeded by (train.seed, step, rank), not from the global RNG: a
    run resumed from a checkpoint masks exactly as the uninterrupted run would have.
    """

    name = "mlm"

    def __init__(self, tokenizer, probability: float, seed: int):
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"train.objective: mlm needs a tokenizer with a mask token; "
                              f"{type(tokenizer).__name__} has none")
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.special = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)
        self.probability, self.seed = probability, seed

    def for_training(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls: the head on masked positions only, where the model has one head
        module beside its encoder (BERT's `cls`, RoBERTa's `lm_head`); else the model as it is."""
        heads = [module for name, module in model.named_children() if name != model.base_model_prefix]
        return _MaskedPositions(model, heads[0]) if len(heads) == 1 else model

    def compat(self) -> dict:
        # Checkpoints of a classifier (which have no such key) do not resume into pretraining.
        return {"train.objective": self.name}

    def build_model(self, cfg: FinetuneConfig, init_from: Path | None = None) -> torch.nn.Module:
        """The backbone with its masked-LM head (a new one where the backbone was shipped without it)."""
        from transformers import AutoModelForMaskedLM

        _quiet_loading()
        source = init_from if init_from is not None else resolve_backbone(cfg.model.backbone)
        return AutoModelForMaskedLM.from_pretrained(source, local_files_only=True)

    def mask(self, batch: dict, seed: list[int]) -> dict:
        """`batch` (input_ids, attention_mask) with tokens masked for prediction; labels hold the original
        ids where masked and -100 (ignored by the loss) elsewhere."""
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        ids = batch["input_ids"]
        candidates = batch["attention_mask"].bool() & ~torch.isin(ids, self.special)
        chosen = (torch.rand(ids.shape, generator=generator) < self.probability) & candidates
        if not chosen.any() and candidates.any():  # a loss over no token is NaN: predict at least one
            chosen.view(-1)[candidates.view(-1).nonzero()[0]] = True
        roll = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator)
        masked = torch.where(chosen & (roll < 0.8), self.mask_id, ids)
        masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
        return {"input_ids": masked, "attention_mask": batch["attention_mask"],
                "labels": torch.where(chosen, ids, -100)}

    def inputs(self, batch: dict, step: int, rank: int) -> dict:
        return self.mask(batch, [self.seed, step, rank])

    @torch.inference_mode()
    def validate(self, model, store: FeatureStore, batch_size: int, pad_id: int,
                 world: distributed.World | None = None, autocast: torch.dtype | None = None) -> dict:
        """Loss and accuracy of the masked-token predictions, over every masked token of the split."""
        world = world or distributed.World()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        indices = np.arange(world.rank, len(store), world.size)
        scorer = self.for_training(model)
        loss_sum, correct, masked = 0.0, 0, 0
        for start in range(0, len(indices), batch_size):
            rows = indices[start:start + batch_size]
            batch = self.mask(store.batch(rows, pad_id), [_VALIDATION_SEED, int(rows[0])])
            batch = {k: v.to(device) for k, v in batch.items()}
            where = batch["labels"] != -100
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                if isinstance(scorer, _MaskedPositions):
                    predicted = scorer.logits(batch["input_ids"], batch["attention_mask"], where).float()
                else:
                    predicted = model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).logits[where].float()
            expected = batch["labels"][where]
            loss_sum += float(torch.nn.functional.cross_entropy(predicted, expected, reduction="sum"))
            correct += int((predicted.argmax(dim=-1) == expected).sum())
            masked += int(where.sum())
        model.train(was_training)
        totals = np.sum([np.array(part, dtype=np.float64) for part in
                         distributed.from_all(world, (loss_sum, correct, masked))], axis=0)
        return {"loss": float(totals[0] / max(totals[2], 1)), "accuracy": float(totals[1] / max(totals[2], 1))}

    def save(self, model, tokenizer, output_dir: Path, cfg: FinetuneConfig, history: dict) -> None:
        """A backbone folder: fine-tuning names it (or its published run) as `model.backbone`.

        A masked-LM model has no pooler (BERT's dense layer over [CLS], which a sequence classifier
        feeds its head from): the backbone's own pooler weights are carried over, untrained, so that
        fine-tuning from this folder does not start from a random one where the backbone had one."""
        from safetensors.torch import load_file, save_file

        _save_common(model, tokenizer, output_dir, cfg, history)
        source = resolve_backbone(cfg.model.backbone) / "model.safetensors"
        if not source.is_file():
            return
        prefix = model.base_model_prefix
        pooler = {key if key.startswith(f"{prefix}.") else f"{prefix}.{key}": value
                  for key, value in load_file(source).items() if ".pooler." in f".{key}"}
        if pooler:
            weights = output_dir / "model.safetensors"
            save_file({**load_file(weights), **pooler}, weights, metadata={"format": "pt"})


def for_run(cfg: FinetuneConfig, tokenizer, labels: list[str]):
    if cfg.train.objective == "mlm":
        return MaskedLM(tokenizer, cfg.train.mlm_probability, cfg.train.seed)
    return Classification(labels)
