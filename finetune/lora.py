"""LoRA fine-tuning of a Jamba checkpoint with Ray Train: the job entry point.

    ray job submit --working-dir . -- python finetune/lora.py --data sub.jsonl --output runs/sub --workers 2
    python finetune/lora.py --data sub.jsonl --output runs/sub      # the same as a plain script

The driver checks every input before any worker starts. It loads the model config and tokenizer, and checks the
LoRA targets against the model built on the meta device, so no weights are read. It reads the data and checks that
every record has its fields, that none is longer than --seq-len, and that --seq-len is within
max_position_embeddings. Finally, an output directory that contains a different run is an error.

The driver then tokenizes the data once, puts it in the Ray object store, and starts a `TorchTrainer` of --workers
workers. Each worker loads the model, wraps it in peft LoRA (`finetune/adapters.py`) and DDP
(`ray.train.torch.prepare_model`, gloo on CPU and NCCL on GPU), and runs the plain-PyTorch loop of
`finetune/train.py` (loss = LM loss + coef * router load-balancing loss).

Every --checkpoint-every steps the workers compute the evaluation loss on the held-out --eval-fraction, and rank 0
reports a checkpoint through `ray.train.report`: the adapter (peft format), the optimizer state and the step.
`FailureConfig(max_failures)` restarts the worker group when a worker dies, and the restarted workers continue from
`ray.train.get_checkpoint()`, so a failure costs at most --checkpoint-every steps. (A checkpoint reported less
than one controller poll before the crash, 2 s by default, may be lost, and the run resumes from the one before.) The batch order is a function of
(seed, step, rank), so the resumed run draws the batches the failed one would have drawn. `--resume` continues a
run whose job itself ended (Ray Train reloads its checkpoint list from `OUTPUT/ray/`).

When training ends the driver copies the final adapter (`adapter_config.json`, `adapter_model.safetensors`) to
--output and writes `metrics.json` beside it. The adapter loads with `finetune.adapters.load_adapter`, with peft on
transformers' `JambaForCausalLM`, and merges with `python -m finetune.merge`.

Jamba-1.5-Mini (52B parameters, 12B active) on 8 GPUs: the bf16 weights alone take about 104 GB, more than one
80 GB GPU, so DDP (a full replica per worker) cannot hold it. The design for that case is FSDP2 (`fully_shard`) over
the 8 workers: each `JambaLayer` (Mamba or attention mixer plus its MoE) is one FSDP unit, so a worker stores 1/8 of
the frozen bf16 base weights (about 13 GB) and gathers one layer at a time for its forward and backward, with
activation checkpointing per layer to bound activation memory at long --seq-len. The LoRA weights and their AdamW
state (fp32) are a few hundred MB and are sharded the same way. Workers build the model on the meta device and
each loads only the tensors of its shards (`jamba.checkpoint.CheckpointReader` reads tensors lazily), and rank 0
gathers the full LoRA state dict for the checkpoint. `--fsdp` raises NotImplementedError until that path can be
tested; this repository's tests run on CPU, where FSDP with gloo is not exercised.

Limitations:
- DDP only: the model must fit in one worker's memory.
- Training runs in fp32; tokens/s in the logs counts the tokens with a loss, per worker.
- With several nodes, --output must be on storage that every node can reach (Ray Train writes checkpoints there),
  and --model must exist on every node (`ray job submit --working-dir .` ships the embedded model with the code).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (`python finetune/lora.py`, as `ray job submit` does): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights

from finetune import data
from finetune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_ADAPTER,
    DEFAULT_TARGETS,
    LoraSpec,
    load_adapter_weights,
    apply_lora,
    parse_targets,
    resolve_targets,
)
from finetune.train import IGNORE_INDEX, StepLog, TrainConfig, make_optimizer, train_steps
from jamba.checkpoint import load_args
from jamba.model import Jamba, default_model_dir
from jamba.tokenizer import Tokenizer

# Named as when imported, so that running the file as a script logs under the same name.
logger = logging.getLogger("finetune.lora")

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
RAY_STORAGE = "ray"  # Ray Train's storage_path, under --output
RUN_NAME = "lora"
LOG_EVERY = 10
DEFAULT_SEQ_LEN = 2048
CHECKPOINT_ADAPTER = "adapter"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"

# Called by every worker before each optimizer step with (step, rank); the recovery test uses it to kill a worker.
StepHook = Callable[[int, int], None]


@dataclass(frozen=True)
class LoraJob:
    """Everything a Ray Train worker needs; built and checked by `plan` on the driver."""

    model_dir: str
    output_dir: str
    lora: LoraSpec
    train: TrainConfig
    workers: int
    batch_size: int  # per worker
    checkpoint_every: int
    pad_id: int
    max_failures: int = 3
    use_gpu: bool = False
    cpus_per_worker: int = 1  # also the torch thread count of a CPU worker
    data: Any = None  # (train, eval) example lists, or a Ray ObjectRef of them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python finetune/lora.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()),
                        help="base checkpoint directory (config.json, safetensors, tokenizer.json); default: the "
                             "embedded model")
    parser.add_argument("--data", required=True,
                        help="a .jsonl/.json, .parquet or .txt file, a directory of such files, or a datasets "
                             "save_to_disk directory; records are {prompt, completion} or {text}")
    parser.add_argument("--output", required=True,
                        help="run directory for the final adapter, run.json, metrics.json and Ray Train checkpoints "
                             "(under ray/)")

    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps in total; default: --epochs passes over the training split")
    parser.add_argument("--epochs", type=float, default=None,
                        help="passes over the training split, when --steps is not given (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (AdamW), reached after a linear warmup over 5%% of the steps and "
                             "decayed by cosine to lr/10")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per worker per step")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="maximum tokens per example (or per packed row); longer records are an error. Batches "
                             f"are padded to their longest example only. Default: the model's "
                             f"max_position_embeddings, at most {DEFAULT_SEQ_LEN}")

    parser.add_argument("--lora-rank", type=int, default=8, help="rank r of each LoRA update")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: update = alpha/r * BA")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="dropout probability on the LoRA branch input")
    parser.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated LoRA targets: in_proj,x_proj,out_proj (Mamba), q/k/v/o_proj "
                             "(attention), gate/up/down_proj (dense MLP), experts.gate/up/down_proj (MoE experts; "
                             "such adapters do not load on transformers 5)")
    parser.add_argument("--train-router", action="store_true",
                        help="also train full copies of the MoE routers (saved in the adapter); off by default")

    parser.add_argument("--eval-fraction", type=float, default=0.05,
                        help="share of the records held out to report the evaluation loss (0 disables it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last Ray Train checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the eval split, batch order and LoRA init")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="steps between checkpoints (and evaluation-loss reports)")

    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, DDP over NCCL")
    parser.add_argument("--aux-loss-coef", type=float, default=None,
                        help="weight of the router load-balancing loss; default: the model's router_aux_loss_coef")
    parser.add_argument("--pack", action="store_true",
                        help="pack several records per row of --seq-len tokens (for plain text; records then see "
                             "each other's context)")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group failures to recover from by resuming at the last checkpoint")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the model over the workers (not implemented yet; see the module docstring)")
    return parser


def run_identity(options: argparse.Namespace, num_records: int) -> dict:
    """The settings that decide what a run computes; `--resume` must find the same ones in run.json."""
    return {
        "model": str(Path(options.model).resolve()),
        "data": str(Path(options.data).resolve()),
        "records": num_records,
        **{key: getattr(options, key) for key in (
            "workers", "steps", "epochs", "lr", "batch_size", "seq_len", "lora_rank", "lora_alpha", "lora_dropout",
            "target_modules", "train_router", "eval_fraction", "seed", "aux_loss_coef", "pack")},
    }


def check_output_dir(output: Path, identity: dict, resume: bool) -> None:
    """Raise ValueError when --output contains something other than this run, or when --resume finds no run."""
    run_file = output / RUN_FILE
    if not run_file.is_file():
        if resume:
            raise ValueError(f"--resume: {output} contains no run to resume ({RUN_FILE} is missing)")
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"output directory {output} is not empty and contains no {RUN_FILE}; choose another "
                             "--output")
        return
    previous = json.loads(run_file.read_text(encoding="utf-8"))
    different = [f"{key}: {previous.get(key)!r} -> {identity.get(key)!r}"
                 for key in sorted(set(previous) | set(identity)) if previous.get(key) != identity.get(key)]
    if different:
        raise ValueError(f"output directory {output} contains a different run ({'; '.join(different)}); choose "
                         "another --output")
    if not resume:
        raise ValueError(f"output directory {output} already contains this run; pass --resume to continue it or "
                         "choose another --output")


def plan(options: argparse.Namespace) -> tuple[LoraJob, dict]:
    """Check every input and build the job; raises ValueError (or NotImplementedError for --fsdp) before Ray."""
    if options.fsdp:
        raise NotImplementedError("--fsdp is not implemented: workers hold a full replica (DDP). Sharding with "
                                  "FSDP2, needed when the model exceeds one worker's memory (Jamba-1.5-Mini on 8 "
                                  "GPUs), is described in the docstring of finetune/lora.py")
    for name in ("workers", "batch_size", "seq_len", "lora_rank", "checkpoint_every"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if options.steps is not None and options.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if options.steps is not None and options.steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {options.steps}")
    if options.epochs is not None and not options.epochs > 0:
        raise ValueError(f"--epochs must be positive, got {options.epochs}")
    if options.max_failures < -1:
        raise ValueError(f"--max-failures must be -1 (no limit) or >= 0, got {options.max_failures}")

    model_dir = Path(options.model)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    args = load_args(model_dir)
    if options.seq_len is None:
        options.seq_len = min(DEFAULT_SEQ_LEN, args.max_position_embeddings)
    if options.seq_len > args.max_position_embeddings:
        raise ValueError(f"--seq-len {options.seq_len} exceeds the model's max_position_embeddings "
                         f"({args.max_position_embeddings})")
    try:
        tokenizer = Tokenizer.from_file(model_dir)
    except FileNotFoundError as error:
        raise ValueError(f"model directory {model_dir} has no tokenizer: {error}") from error

    spec = LoraSpec(rank=options.lora_rank, alpha=options.lora_alpha, dropout=options.lora_dropout,
                    targets=parse_targets(options.target_modules), train_router=options.train_router)
    with init_empty_weights():
        skeleton = Jamba(args)
    resolve_targets(skeleton, spec.targets)
    if spec.train_router and not any(kind.has_experts for kind in args.layer_schedule()):
        raise ValueError("--train-router needs a model with MoE layers, and this one has none")

    records = data.load_records(options.data)
    examples = data.encode(records, tokenizer)
    data.check_lengths(examples, options.seq_len)
    train_set, eval_set = data.split_eval(examples, options.eval_fraction, options.seed)
    if options.pack:
        train_set = data.pack(train_set, options.seq_len)
    per_epoch = data.steps_per_epoch(len(train_set), options.batch_size, options.workers)
    if per_epoch < 1:
        raise ValueError(f"{len(train_set)} training examples are fewer than one global batch of "
                         f"{options.batch_size * options.workers} (--batch-size x --workers)")
    steps = options.steps or max(1, round((options.epochs or 1.0) * per_epoch))
    logger.info("data: %s; train %s; eval %d examples; %d steps (%.2f epochs)", options.data,
                data.summary(train_set), len(eval_set), steps, steps / per_epoch)

    identity = run_identity(options, len(records))
    check_output_dir(Path(options.output), identity, options.resume)
    train = TrainConfig(steps=steps, batch_size=options.batch_size, lr=options.lr, min_lr=options.lr / 10,
                        warmup_steps=steps // 20, weight_decay=0.0, aux_loss_coef=options.aux_loss_coef,
                        log_every=min(LOG_EVERY, options.checkpoint_every), seed=options.seed)
    job = LoraJob(model_dir=str(model_dir.resolve()), output_dir=str(Path(options.output).resolve()), lora=spec,
                  train=train, workers=options.workers, batch_size=options.batch_size,
                  checkpoint_every=options.checkpoint_every, pad_id=tokenizer.pad_id,
                  max_failures=options.max_failures, use_gpu=options.use_gpu, data=(train_set, eval_set))
    return job, identity


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, examples: Sequence[data.Example], batch_size: int, pad_id: int,
                    rank: int, world_size: int) -> float | None:
    """Mean LM loss per labelled token over all examples, each rank taking every world_size-th batch."""
    if not examples:
        return None
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, labelled tokens
    was_training = model.training
    model.eval()
    for start in range(rank * batch_size, len(examples), world_size * batch_size):
        batch = {k: v.to(device) for k, v in data.pad_batch(examples[start:start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        totals[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
        totals[1] += (labels != IGNORE_INDEX).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    return float(totals[0] / totals[1].clamp(min=1))


def _save_checkpoint(model, optimizer, step: int, directory: Path) -> None:
    model.save_pretrained(str(directory / CHECKPOINT_ADAPTER))
    torch.save(optimizer.state_dict(), directory / CHECKPOINT_OPTIMIZER)
    (directory / CHECKPOINT_STATE).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")


def _with_hook(stream: Iterator[dict], hook: StepHook | None, step: int, rank: int) -> Iterator[dict]:
    for batch in stream:
        if hook is not None:
            hook(step, rank)
        yield batch
        step += 1


def _configure_worker_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if rank != 0:
        for name in ("finetune", "jamba"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(job: LoraJob, before_step: StepHook | None = None) -> None:
    """Run one TorchTrainer worker: restore the last checkpoint, then train and report every checkpoint_every steps."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _configure_worker_logging(rank)
    if not job.use_gpu:
        torch.set_num_threads(job.cpus_per_worker)
    torch.manual_seed(job.train.seed)
    train_set, eval_set = ray.get(job.data) if isinstance(job.data, ray.ObjectRef) else job.data

    model = apply_lora(Jamba.from_pretrained(job.model_dir), job.lora, base_model_path=job.model_dir)
    step, optimizer_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            load_adapter_weights(model, directory / CHECKPOINT_ADAPTER, DEFAULT_ADAPTER)
            optimizer_state = torch.load(directory / CHECKPOINT_OPTIMIZER, weights_only=True)
            step = json.loads((directory / CHECKPOINT_STATE).read_text(encoding="utf-8"))["step"]
        logger.info("resuming from the checkpoint at step %d", step)
    resumed_from = step

    # An expert that receives no token in a batch leaves its LoRA weights without a gradient, which DDP must allow.
    unused = any(target.startswith("experts.") for target in job.lora.targets)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    optimizer = make_optimizer(ddp_model, job.train)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if rank == 0:
        logger.info("training steps %d..%d on %d workers, %d examples per worker per step", step, job.train.steps,
                    world_size, job.batch_size)

    while True:
        logs: list[StepLog] = []
        if step < job.train.steps:
            end = min(job.train.steps, (step // job.checkpoint_every + 1) * job.checkpoint_every)
            stream = data.batches(train_set, job.batch_size, world_size, rank, job.train.seed, job.pad_id, step, end)
            train_steps(ddp_model, _with_hook(stream, before_step, step, rank), job.train, optimizer,
                        on_log=logs.append, start_step=step)
            step = end

        eval_loss = evaluation_loss(model, eval_set, job.batch_size, job.pad_id, rank, world_size)
        metrics = {"step": step, "resumed_from": resumed_from}
        if logs:
            metrics.update({k: v for k, v in asdict(logs[-1]).items() if k != "step"})
        if eval_loss is not None:
            metrics["eval_loss"] = eval_loss
            if rank == 0:
                logger.info("step %d/%d  eval loss %.4f on %d examples", step, job.train.steps, eval_loss,
                            len(eval_set))
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                _save_checkpoint(model, optimizer, step, Path(directory))
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if step >= job.train.steps:
            break


def run(job: LoraJob, before_step: StepHook | None = None):
    """Train with a TorchTrainer and copy the final adapter into the output directory; returns Ray's Result.

    Needs a connected Ray (`ray.init`). Raises ray.train.TrainingFailedError when the workers fail more than
    max_failures times.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune.ray_backend import BoundStoreTorchConfig

    output = Path(job.output_dir)
    if not isinstance(job.data, ray.ObjectRef):
        job = replace(job, data=ray.put(job.data))
    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    trainer = TorchTrainer(
        partial(train_worker, job, before_step=before_step),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        torch_config=BoundStoreTorchConfig(),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(output / RAY_STORAGE),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()

    with result.checkpoint.as_directory() as directory:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(Path(directory) / CHECKPOINT_ADAPTER / name, output / name)
    (output / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    logger.info("adapter written to %s; final metrics %s", output, result.metrics)
    return result


def connect_ray() -> None:
    """Connect to the Ray cluster of the job, or of RAY_ADDRESS, or start a local one.

    Under `ray job submit --working-dir .`, Ray ships the code to every node. A plain run instead puts the repository
    on the workers' PYTHONPATH, so it works on one machine or with a shared file system.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        ray.init()
        return
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        job, identity = plan(options)
    except (ValueError, NotImplementedError) as error:
        parser.error(str(error))

    output = Path(job.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    connect_ray()
    run(job)


if __name__ == "__main__":
    main()
