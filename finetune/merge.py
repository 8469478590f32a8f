"""Fold a LoRA adapter into its base model and write an ordinary checkpoint.

    python -m finetune.merge --model jamba/default --adapter runs/sub --output runs/sub-merged

Each target W becomes W + (alpha / r) * B @ A, and router copies trained with --train-router replace the routers.
The output is the Hugging Face layout of `jamba/checkpoint.py` (config.json and model.safetensors, per-expert
tensor names), so it loads with `Jamba.from_pretrained` and with transformers' `JambaForCausalLM.from_pretrained`.
The tokenizer files and task.json of the base model directory are copied next to it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from finetune.adapters import load_adapter
from jamba.model import Jamba, default_model_dir

logger = logging.getLogger(__name__)

# Files of a model directory that describe it beyond its weights.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "task.json")


def merge(model_dir: str | Path, adapter_dir: str | Path, output_dir: str | Path) -> Jamba:
    """Write the merged checkpoint to output_dir and return the merged model."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if output_dir.resolve() in (model_dir.resolve(), Path(adapter_dir).resolve()):
        raise ValueError(f"output directory {output_dir} must differ from the model and adapter directories")
    merged = load_adapter(Jamba.from_pretrained(model_dir), adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    for name in COMPANION_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output_dir / name)
    logger.info("merged %s into %s: wrote %s", adapter_dir, model_dir, output_dir)
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()), help="base checkpoint directory "
                        "(default: the embedded model)")
    parser.add_argument("--adapter", required=True, help="peft adapter directory (adapter_config.json, "
                        "adapter_model.safetensors), as written by finetune/lora.py")
    parser.add_argument("--output", required=True, help="directory for the merged checkpoint")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        merge(args.model, args.adapter, args.output)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
