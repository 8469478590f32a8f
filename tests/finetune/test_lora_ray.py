"""The Ray Train path of finetune/lora.py: 2 CPU workers on a tiny model, a killed worker, and --resume."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from finetune import lora  # noqa: E402
from finetune.adapters import load_adapter  # noqa: E402
from finetune.arith import TaskSpec, generate, write_jsonl  # noqa: E402
from jamba.model import Jamba  # noqa: E402
from test_lora import make_model_dir  # noqa: E402

STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 2, 3
POLL_S = 0.25


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A private Ray instance on the loopback interface, with the repository on the workers' PYTHONPATH."""
    from ray import cloudpickle

    # The kill hook below is defined in this test module, which the workers cannot import by name.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # makes Ray use 127.0.0.1 as the node address
    patch.delenv("RAY_ADDRESS", raising=False)
    # The controller collects reports when it polls the workers; a report made less than one poll before a crash
    # is lost. A short poll (default 2 s) and the pause in kill_once keep the test fast and the outcome certain.
    patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_S))
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(tmp_path_factory.mktemp("ray")),
             runtime_env={"env_vars": {"PYTHONPATH": str(lora.REPO_ROOT)}})
    yield
    ray.shutdown()
    patch.undo()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def kill_once(marker: str, rank_to_kill: int, at_step: int):
    """A before_step hook: the first time rank_to_kill reaches at_step, its process exits without cleanup."""
    def hook(step: int, rank: int) -> None:
        if rank == rank_to_kill and step == at_step and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(4 * POLL_S)
            os._exit(1)
    return hook


def record_listeners(path: str):
    """A before_step hook: at step 1, rank 0 writes every TCP listener of its own process to `path`."""
    def hook(step: int, rank: int) -> None:
        if rank == 0 and step == 1:
            lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
            mine = [line for line in lines if f"pid={os.getpid()}," in line]
            with open(path, "w") as f:
                f.write("\n".join(mine))
    return hook


def test_rendezvous_listens_on_loopback_only(local_ray, tmp_path):
    listeners = tmp_path / "listeners.txt"
    lora.run(plan_job(tmp_path), before_step=record_listeners(str(listeners)))

    lines = [line for line in listeners.read_text().splitlines() if line.strip()]
    exposed = [line for line in lines if not line.split()[3].startswith(("127.", "[::1]", "[::ffff:127."))]
    assert lines, "rank 0 holds the process group's store, so it listens on at least one port"
    assert not exposed, f"listening beyond loopback: {exposed}"


def plan_job(tmp_path, *extra):
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        make_model_dir(model_dir)
        write_jsonl(tmp_path / "sub.jsonl", generate(TaskSpec(ops=("sub",)), "train", 120, 0))
    options = lora.build_parser().parse_args([
        "--model", str(model_dir), "--data", str(tmp_path / "sub.jsonl"), "--output", str(tmp_path / "out"),
        "--workers", "2", "--batch-size", "8", "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--eval-fraction", "0.1", "--seq-len", "32", *extra])
    job, identity = lora.plan(options)
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / lora.RUN_FILE).write_text(json.dumps(identity), encoding="utf-8")
    return job


def check_adapter(tmp_path):
    model = load_adapter(Jamba.from_pretrained(tmp_path / "model"), tmp_path / "out")
    base = Jamba.from_pretrained(tmp_path / "model")
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 0, "training must have changed the adapter"
    metrics = json.loads((tmp_path / "out" / lora.METRICS_FILE).read_text())
    assert metrics["step"] == STEPS
    assert metrics["eval_loss"] > 0


def test_run_resumes_after_worker_killed(local_ray, tmp_path):
    job = plan_job(tmp_path)
    result = lora.run(job, before_step=kill_once(str(tmp_path / "killed"), rank_to_kill=1, at_step=KILL_AT))

    assert (tmp_path / "killed").exists(), "the hook must have killed a worker"
    assert result.metrics["step"] == STEPS
    # The restarted workers began at the checkpoint of step 2, not at step 0.
    assert result.metrics["resumed_from"] == KILL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    check_adapter(tmp_path)


def test_run_resume_flag_after_failed_job(local_ray, tmp_path):
    job = plan_job(tmp_path, "--max-failures", "0")
    with pytest.raises(Exception, match="(?i)fail|exit|died"):
        lora.run(job, before_step=kill_once(str(tmp_path / "killed"), rank_to_kill=0, at_step=KILL_AT))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

    with pytest.raises(ValueError, match="already contains this run; pass --resume"):
        plan_job(tmp_path, "--max-failures", "0")
    result = lora.run(plan_job(tmp_path, "--max-failures", "0", "--resume"))
    assert result.metrics["resumed_from"] == KILL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    check_adapter(tmp_path)
