import pytest
import torch

from finetune.arith import TaskSpec, corpus_for_tokenizer, generate
from finetune.train import (
    IGNORE_INDEX,
    TrainConfig,
    collate,
    compute_loss,
    lr_at,
    shuffled_batches,
    train_steps,
)
from jamba.model import Jamba, JambaArgs
from jamba.tokenizer import Tokenizer, train_tokenizer

SPEC = TaskSpec(ops=("add", "mul"), add_digits=(2, 2), mul_digits=(1, 1))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(train_tokenizer(corpus_for_tokenizer(SPEC, 300, seed=0), vocab_size=300))


@pytest.fixture(scope="module")
def records():
    return [{"prompt": p.prompt, "completion": p.completion} for p in generate(SPEC, "train", 256, seed=0)]


def tiny_model(tokenizer, **overrides):
    torch.manual_seed(0)
    return Jamba(JambaArgs.from_preset("tiny", vocab_size=tokenizer.vocab_size, **overrides))


def test_labels_cover_completion_and_eos_only(tokenizer):
    batch = collate([{"prompt": "12+34=", "completion": "46"}, {"prompt": "7*8=", "completion": "56"}], tokenizer)

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, 9)
    assert tokenizer.decode(ids[0].tolist()) == "12+34=46"
    assert ids[0, -1] == tokenizer.eos_id
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + tokenizer.encode("46") + [tokenizer.eos_id]
    # The shorter row is padded on the right; padding is neither attended to nor learned.
    assert labels[1].tolist() == [IGNORE_INDEX] * 4 + tokenizer.encode("56") + [tokenizer.eos_id] + [IGNORE_INDEX] * 2
    assert mask[1].tolist() == [1] * 7 + [0] * 2
    assert ids[1, 7:].tolist() == [tokenizer.pad_id] * 2


def test_collate_rejects_bad_records(tokenizer):
    with pytest.raises(ValueError, match="completion"):
        collate([{"prompt": "1+1="}], tokenizer)
    with pytest.raises(ValueError, match="empty"):
        collate([], tokenizer)


def test_loss_ignores_prompt_tokens(tokenizer):
    model = tiny_model(tokenizer).eval()
    batch = collate([{"prompt": "12+34=", "completion": "46"}], tokenizer)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["labels"][0, 1] = changed["input_ids"][0, 1]  # label one prompt token

    with torch.no_grad():
        _, lm_loss, _ = compute_loss(model, batch)
        _, lm_changed, _ = compute_loss(model, changed)
        logits = model(batch["input_ids"]).logits[0, :-1]
    targets = batch["input_ids"][0, 1:]
    completion = batch["labels"][0, 1:] != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[completion], targets[completion])

    assert torch.allclose(lm_loss, expected, atol=1e-6)
    assert not torch.allclose(lm_loss, lm_changed)


def test_aux_loss_enters_with_its_coefficient(tokenizer, records):
    model = tiny_model(tokenizer, router_aux_loss_coef=0.25).eval()
    batch = collate(records[:8], tokenizer)

    with torch.no_grad():
        total, lm_loss, aux_loss = compute_loss(model, batch)
        total_off, _, _ = compute_loss(model, batch, aux_loss_coef=0.0)
        total_big, _, _ = compute_loss(model, batch, aux_loss_coef=2.0)

    assert aux_loss.item() > 1.0  # about K = 2 at init
    assert torch.allclose(total, lm_loss + 0.25 * aux_loss)
    assert torch.allclose(total_off, lm_loss)
    assert torch.allclose(total_big, lm_loss + 2.0 * aux_loss)


def test_loss_decreases(tokenizer, records):
    model = tiny_model(tokenizer)
    config = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, log_every=10)
    seen = []

    logs = train_steps(model, shuffled_batches(records, tokenizer, config.batch_size), config, on_log=seen.append)

    assert [log.step for log in logs] == [10, 20, 30, 40]
    assert seen == logs
    assert logs[-1].lm_loss < 0.6 * logs[0].lm_loss, [round(log.lm_loss, 3) for log in logs]
    assert all(log.aux_loss > 0 and log.tokens_per_s > 0 for log in logs)
    assert not model.training


def test_only_trainable_parameters_change(tokenizer, records):
    model = tiny_model(tokenizer)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("lm_head") or ".router." in name
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(steps=3, batch_size=16, lr=1e-2, warmup_steps=0, log_every=1)

    train_steps(model, shuffled_batches(records, tokenizer, config.batch_size), config)

    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == p.requires_grad, name


def test_stops_when_batches_run_out(tokenizer, records):
    model = tiny_model(tokenizer)
    config = TrainConfig(steps=100, batch_size=16, warmup_steps=0, log_every=1)
    batches = [collate(records[i:i + 16], tokenizer) for i in (0, 16)]

    logs = train_steps(model, batches, config)

    assert [log.step for log in logs] == [1, 2]


def test_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)

    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(55, config) == pytest.approx(5.5e-4)
    assert lr_at(100, config) == pytest.approx(1e-4)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 100))


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("min_lr", 1.0),
                                          ("warmup_steps", -1), ("grad_clip", -1.0), ("aux_loss_coef", -0.1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
