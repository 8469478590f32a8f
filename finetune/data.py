"""Fine-tuning data: local files read with `datasets`, tokenized, split for evaluation, and batched per worker.

Accepted inputs (`--data`):
- a file: `.jsonl` or `.json` (one JSON object per line), `.parquet`, or `.txt` (one text record per line, blank
  lines skipped);
- a directory written by `datasets`' `save_to_disk` (a `DatasetDict` must have a "train" split);
- a directory of such files, all of one kind.

Two record schemas:
- prompt/completion: `{"prompt": "382-119=", "completion": "263"}`. Tokens are `tokenizer.encode(prompt)`, then
  the completion's ids, then eos, exactly as `finetune/train.py` encodes them (no bos, which is how the embedded
  model was trained). The loss covers the completion and eos only.
- plain text: `{"text": "..."}`, tokenized as text + eos, with the loss on every token.

Batches are right-padded to the longest example of the batch (labels -100 on padding). With packing, consecutive
examples are first concatenated into rows of at most seq_len tokens. That wastes no compute on padding, but the
Mamba state and attention then run across example boundaries. It suits plain text, and not prompt/completion pairs
whose prompt must stand alone.

The batch order is a pure function of (seed, step, rank), so a worker that resumes at step s draws the same
batches it would have drawn without the interruption.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from finetune.train import IGNORE_INDEX, encode_record
from jamba.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPLETION_FIELDS = ("prompt", "completion")
TEXT_FIELD = "text"


@dataclass(frozen=True)
class Example:
    """One tokenized record: input ids and the labels aligned with them (-100 where no loss is taken)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


def _data_files(directory: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in FILE_LOADERS)
    if not files:
        raise ValueError(f"data directory {directory} contains no {', '.join(FILE_LOADERS)} files and is not a "
                         "dataset saved with save_to_disk")
    loaders = {FILE_LOADERS[p.suffix] for p in files}
    if len(loaders) > 1:
        raise ValueError(f"data directory {directory} mixes file kinds {sorted(loaders)}; use one kind")
    return loaders.pop(), [str(p) for p in files]


def load_records(path: str | Path) -> datasets.Dataset:
    """Load the records of a file, a directory of files, or a dataset saved to disk. Raises ValueError when the
    path is missing, of an unknown kind, or contains no records."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                          or (path / "state.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise ValueError(f"dataset {path} has splits {sorted(dataset)}, but no 'train' split")
            dataset = dataset["train"]
    else:
        if path.is_dir():
            loader, files = _data_files(path)
        elif path.suffix in FILE_LOADERS:
            loader, files = FILE_LOADERS[path.suffix], [str(path)]
        else:
            raise ValueError(f"data file {path} has an unknown extension; use one of {', '.join(FILE_LOADERS)}")
        files = [f for f in files if Path(f).stat().st_size > 0]
        if not files:
            raise ValueError(f"data {path} contains no records (empty file)")
        try:
            dataset = datasets.load_dataset(loader, data_files=files, split="train")
        except Exception as error:  # datasets wraps parse errors in several exception types
            raise ValueError(f"cannot read {path} as {loader}: {error}") from error
        if loader == "text":
            dataset = dataset.filter(lambda record: bool(record[TEXT_FIELD].strip()))
    if len(dataset) == 0:
        raise ValueError(f"data {path} contains no records")
    return dataset


def record_kind(dataset: datasets.Dataset) -> str:
    """Return "completion" or "text" from the columns, and check that every record has the fields it needs."""
    columns = set(dataset.column_names)
    if columns & set(COMPLETION_FIELDS):
        kind, needed = "completion", COMPLETION_FIELDS
    elif TEXT_FIELD in columns:
        kind, needed = "text", (TEXT_FIELD,)
    else:
        raise ValueError(f"records need 'prompt' and 'completion' fields, or a 'text' field; got columns "
                         f"{sorted(columns)}")
    for name in needed:
        if name not in columns:
            raise ValueError(f"records have a {sorted(columns & set(COMPLETION_FIELDS))} field but no {name!r} field")
        for row, value in enumerate(dataset[name]):
            if not isinstance(value, str):
                raise ValueError(f"record {row} has no string {name!r} field (got {value!r})")
    return kind


def encode(dataset: datasets.Dataset, tokenizer: Tokenizer) -> list[Example]:
    """Tokenize every record; see the module docstring for the two schemas."""
    kind = record_kind(dataset)
    examples = []
    if kind == "completion":
        for prompt, completion in zip(dataset["prompt"], dataset["completion"]):
            ids, prompt_len = encode_record(tokenizer, prompt, completion)
            examples.append(Example(tuple(ids), (IGNORE_INDEX,) * prompt_len + tuple(ids[prompt_len:])))
    else:
        for text in dataset[TEXT_FIELD]:
            ids = (*tokenizer.encode(text), tokenizer.eos_id)
            examples.append(Example(ids, ids))
    return examples


def check_lengths(examples: Sequence[Example], seq_len: int) -> None:
    """Raise ValueError naming the first record longer than seq_len tokens and how many are."""
    too_long = [i for i, example in enumerate(examples) if len(example.ids) > seq_len]
    if too_long:
        first = too_long[0]
        longest = max(len(examples[i].ids) for i in too_long)
        raise ValueError(f"{len(too_long)} records are longer than --seq-len {seq_len} tokens (record {first} has "
                         f"{len(examples[first].ids)}, the longest {longest}); raise --seq-len or shorten them")


def split_eval(examples: Sequence[Example], eval_fraction: float,
               seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a seeded random eval_fraction of the examples (at least one when the fraction is positive)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(examples)))
    if num_eval >= len(examples):
        raise ValueError(f"eval fraction {eval_fraction} of {len(examples)} records leaves none for training")
    eval_set = sorted(order[:num_eval])
    train_set = sorted(order[num_eval:])
    return [examples[i] for i in train_set], [examples[i] for i in eval_set]


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most seq_len tokens (each example stays whole)."""
    rows, ids, labels = [], [], []
    for example in examples:
        if ids and len(ids) + len(example.ids) > seq_len:
            rows.append(Example(tuple(ids), tuple(labels)))
            ids, labels = [], []
        ids += example.ids
        labels += example.labels
    if ids:
        rows.append(Example(tuple(ids), tuple(labels)))
    return rows


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids, attention_mask and labels (B, L), L the longest example."""
    length = max(len(example.ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids)
        input_ids[row, :n] = torch.tensor(example.ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def steps_per_epoch(num_examples: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps in one pass over the examples; the remainder of each pass is dropped."""
    return num_examples // (batch_size * world_size)


def batch_indices(num_examples: int, batch_size: int, world_size: int, rank: int, seed: int,
                  step: int) -> list[int]:
    """Return the example indices of `rank`'s batch at optimizer step `step`.

    Each pass over the data is a fresh permutation drawn from (seed, epoch). Step i of a pass takes the i-th global
    batch of batch_size * world_size examples from it, and each rank takes its own slice of that batch.
    """
    per_epoch = steps_per_epoch(num_examples, batch_size, world_size)
    if per_epoch < 1:
        raise ValueError(f"{num_examples} training examples are fewer than one global batch "
                         f"({batch_size} per worker x {world_size} workers)")
    epoch, index = divmod(step, per_epoch)
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    start = (index * world_size + rank) * batch_size
    return order[start:start + batch_size]


def batches(examples: Sequence[Example], batch_size: int, world_size: int, rank: int, seed: int, pad_id: int,
            start_step: int, end_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield `rank`'s padded batches for the optimizer steps start_step .. end_step - 1."""
    for step in range(start_step, end_step):
        chosen = batch_indices(len(examples), batch_size, world_size, rank, seed, step)
        yield pad_batch([examples[i] for i in chosen], pad_id)


def summary(examples: Sequence[Example]) -> str:
    lengths = [len(example.ids) for example in examples]
    labelled = sum(sum(label != IGNORE_INDEX for label in example.labels) for example in examples)
    return (f"{len(examples)} examples, {sum(lengths)} tokens ({labelled} with loss), length "
            f"{min(lengths)}..{max(lengths)}")
