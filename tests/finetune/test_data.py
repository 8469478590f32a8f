import json

import datasets
import pytest

from finetune import data
from finetune.train import IGNORE_INDEX, collate
from jamba.tokenizer import Tokenizer, train_tokenizer

RECORDS = [{"prompt": f"{a}-{b}=", "completion": str(a - b)} for a, b in [(75, 15), (55, 48), (903, 4), (10, 10)]]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    corpus = [r["prompt"] + r["completion"] for r in RECORDS] + ["the answer follows the sign"] * 5
    return Tokenizer(train_tokenizer(corpus, vocab_size=280, min_frequency=1))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_completion_matches_train_collate(tmp_path, tokenizer):
    examples = data.encode(data.load_records(write_jsonl(tmp_path / "sub.jsonl", RECORDS)), tokenizer)
    batch = data.pad_batch(examples, tokenizer.pad_id)
    expected = collate(RECORDS, tokenizer)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].tolist() == expected[key].tolist(), key
    first = examples[0]
    prompt_len = len(tokenizer.encode(RECORDS[0]["prompt"]))
    assert first.ids[0] != tokenizer.bos_id, "the embedded model's prompts carry no bos"
    assert first.labels[:prompt_len] == (IGNORE_INDEX,) * prompt_len
    assert first.ids[-1] == tokenizer.eos_id
    assert first.labels[-1] == tokenizer.eos_id


def test_text_file_loss_on_all_tokens(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("the answer follows\n\n   \nthe sign\n", encoding="utf-8")
    examples = data.encode(data.load_records(path), tokenizer)
    assert len(examples) == 2
    assert examples[0].ids == (*tokenizer.encode("the answer follows"), tokenizer.eos_id)
    assert examples[0].labels == examples[0].ids


def test_parquet_saved_and_directory_inputs(tmp_path, tokenizer):
    reference = data.encode(data.load_records(write_jsonl(tmp_path / "a.jsonl", RECORDS)), tokenizer)

    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.to_parquet(str(tmp_path / "sub.parquet"))
    assert data.encode(data.load_records(tmp_path / "sub.parquet"), tokenizer) == reference

    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    assert data.encode(data.load_records(tmp_path / "saved_dict"), tokenizer) == reference
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert data.encode(data.load_records(tmp_path / "saved"), tokenizer) == reference

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", RECORDS[:2])
    write_jsonl(folder / "part-1.jsonl", RECORDS[2:])
    assert data.encode(data.load_records(folder), tokenizer) == reference


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "contains no records"),
    ('{"prompt": "1-1=", "completion": "0"}\n{"prompt": "2-1="}\n', "record 1 has no string 'completion'"),
    ('{"question": "1-1=", "answer": "0"}\n', "records need 'prompt' and 'completion' fields, or a 'text' field"),
    ('{"completion": "0"}\n', "no 'prompt' field"),
])
def test_bad_data_rejected(tmp_path, tokenizer, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        data.encode(data.load_records(path), tokenizer)


def test_bad_paths_rejected(tmp_path):
    (tmp_path / "data.csv").write_text("prompt,completion\n1-1=,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown extension"):
        data.load_records(tmp_path / "data.csv")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", RECORDS)
    (mixed / "b.txt").write_text("some text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mixes file kinds"):
        data.load_records(mixed)

    datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match="no 'train' split"):
        data.load_records(tmp_path / "no_train")


def test_check_lengths_names_record(tokenizer):
    examples = [data.Example((1,) * n, (1,) * n) for n in (3, 9, 4, 12)]
    data.check_lengths(examples, 12)
    with pytest.raises(ValueError, match=r"2 records are longer than --seq-len 8 tokens \(record 1 has 9, the "
                                         r"longest 12\)"):
        data.check_lengths(examples, 8)


def test_split_eval_seeded_disjoint():
    examples = [data.Example((i,), (i,)) for i in range(100)]
    train, held_out = data.split_eval(examples, 0.1, seed=3)
    assert len(held_out) == 10
    assert len(train) == 90
    assert not set(train) & set(held_out)
    assert data.split_eval(examples, 0.1, seed=3) == (train, held_out)
    assert data.split_eval(examples, 0.0, seed=3) == (examples, [])
    assert len(data.split_eval(examples[:5], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="eval fraction"):
        data.split_eval(examples, 1.0, seed=0)


def test_pack_keeps_examples_whole():
    examples = [data.Example((i,) * n, (i,) * n) for i, n in enumerate([3, 4, 2, 5, 1])]
    rows = data.pack(examples, seq_len=7)
    assert [len(row.ids) for row in rows] == [7, 7, 1]
    assert [t for row in rows for t in row.ids] == [t for example in examples for t in example.ids]


def test_batch_order_seed_step_rank():
    num, batch_size, world = 50, 4, 3
    per_epoch = data.steps_per_epoch(num, batch_size, world)
    assert per_epoch == 4
    for step in (0, 5):
        chosen = [data.batch_indices(num, batch_size, world, rank, seed=1, step=step) for rank in range(world)]
        flat = [i for rank in chosen for i in rank]
        assert len(flat) == len(set(flat)) == batch_size * world, "ranks draw disjoint examples in a step"
    epoch = [i for step in range(per_epoch) for rank in range(world)
             for i in data.batch_indices(num, batch_size, world, rank, seed=1, step=step)]
    assert len(set(epoch)) == len(epoch), "one epoch never repeats an example"
    assert data.batch_indices(num, batch_size, world, 0, 1, 2) == data.batch_indices(num, batch_size, world, 0, 1, 2)

    examples = [data.Example((i + 3,), (i + 3,)) for i in range(num)]
    whole = list(data.batches(examples, batch_size, world, 1, 1, 0, start_step=0, end_step=6))
    resumed = list(data.batches(examples, batch_size, world, 1, 1, 0, start_step=4, end_step=6))
    assert [b["input_ids"].tolist() for b in resumed] == [b["input_ids"].tolist() for b in whole[4:]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.batch_indices(5, 4, 2, 0, 0, 0)
