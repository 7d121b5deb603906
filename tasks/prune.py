"""Vocabulary pruning as a Flyte task: a thin wrapper over flytetune.prune (README, "Vocabulary pruning").

Runs in the train image (the default): it reads and writes safetensors with torch.
"""

import logging
from pathlib import Path
from typing import Optional

from flytekit import task

from flytetune import backbone_cache, storage
from flytetune import prune as pruning
from tasks.context import workdir
from tasks.pods import pod_template, step

# flytekit configures only its own logger; without this the library's progress lines vanish.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _local(uri: str, name: str) -> str:
    """A local path for `uri`: itself when local (or an installed model package's name), else a copy
    under the task's working directory (one object with its file name kept, or every object under a prefix)."""
    if storage.is_local(uri):
        return str(storage.local_path(uri))
    dest = workdir(name)
    if storage.stat(uri) is not None:
        target = dest / uri.rstrip("/").rsplit("/", 1)[-1]
        storage.copy(uri, str(target))
        return str(target)
    storage.sync(uri, str(dest))
    return str(dest)


# Reads and writes object storage: the AWS web identity (tasks/pods.py).
@task(pod_template=pod_template(), **step("prune"))
def prune_model(model: str, corpus_uri: str, output_uri: str, heldout_uri: Optional[str], text_column: str,
                min_count: int, floor: int, keep_chars: bool, overwrite: bool) -> str:
    """Prune `model` (an installed model package, a model folder or its URI) to the tokens of the texts at
    `corpus_uri`; write the pruned model folder to `output_uri` and return it."""
    if not storage.is_local(output_uri) and storage.ls(output_uri) and not overwrite:
        raise pruning.PruneError(f"output_uri: {output_uri} already holds objects; choose another or set overwrite")
    local_out = (storage.local_path(output_uri) if storage.is_local(output_uri)
                 else workdir("pruned") / Path(output_uri.rstrip("/")).name)
    # The model through model.backbone's resolution: a URI is fetched and verified against its manifest.
    pruning.prune(model, _local(corpus_uri, "corpus"), local_out,
                  heldout=_local(heldout_uri, "heldout") if heldout_uri else None, text_column=text_column,
                  min_count=min_count, floor=floor, keep_chars=keep_chars, overwrite=overwrite)
    if not storage.is_local(output_uri):
        # With a manifest, written last: a half-uploaded folder is never taken for a backbone, and
        # model.backbone=<output_uri> verifies every file.
        backbone_cache.publish(local_out, output_uri)
    return output_uri
