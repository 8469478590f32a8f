"""LoRA adapters for serving: every adapter in a directory, loaded into one peft model and picked per request.

An adapter is a folder `<directory>/<name>/` holding peft's `adapter_config.json` and `adapter_model.safetensors`
(what `finetune/lora.py` writes). The requests of one batch may use different adapters: the runner passes peft one
adapter name per batch row, and rows without an adapter run the base model.
"""

import logging
from pathlib import Path

import torch
from peft import PeftModel

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# peft's name for "no adapter" in a mixed batch.
BASE_MODEL_ROW = "__base__"


def find_adapters(directory: str | Path) -> list[Path]:
    """Return the adapter folders in `directory`, sorted by name; raises ValueError when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapters directory {directory} not found")
    folders = sorted(p for p in directory.iterdir() if (p / ADAPTER_CONFIG).is_file())
    if not folders:
        raise ValueError(f"no adapter in {directory}: expected folders <name>/ holding {ADAPTER_CONFIG}")
    reserved = [p.name for p in folders if p.name == BASE_MODEL_ROW]
    if reserved:
        raise ValueError(f"adapter name {BASE_MODEL_ROW!r} is reserved for the base model; rename that folder")
    return folders


def load_adapters(model: torch.nn.Module, directory: str | Path) -> tuple[PeftModel, tuple[str, ...]]:
    """Wrap `model` with every adapter of `directory`; returns the peft model and the adapter names."""
    folders = find_adapters(directory)
    peft_model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=folders[0].name, is_trainable=False)
    for folder in folders[1:]:
        peft_model.load_adapter(str(folder), adapter_name=folder.name, is_trainable=False)
    names = tuple(p.name for p in folders)
    log.info("loaded %d adapters from %s: %s", len(names), directory, ", ".join(names))
    return peft_model.eval(), names


def adapter_rows(adapters) -> list[str]:
    """peft's per-row adapter names for a batch, with the base model for rows without an adapter."""
    return [name or BASE_MODEL_ROW for name in adapters]
