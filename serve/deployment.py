"""The Ray Serve application: JambaService over gRPC, one model replica per Serve replica.

`serve run serve/serve_config.yaml` (or KubeRay's RayService, which embeds the same file) builds the application
with `build_app`. It has two deployments:

- `JambaDeployment`, autoscaled on ongoing requests: each replica owns a continuous-batching engine over a
  `cluster.replica.RayReplica`, whose layer groups and expert shards are actors of their own, so scaling adds and
  removes whole model replicas.
- `GrpcIngress`, one replica: the gRPC server of `serve/server.py` (JambaService, grpc.health.v1 with NOT_SERVING
  while draining, reflection, deadlines, optional bearer token), forwarding each request to `JambaDeployment`
  through a deployment handle.

Why an ingress of our own instead of Serve's gRPC proxy: the proxy (Ray 2.60) listens on every interface with no
way to choose the address, has no grpc.health.v1, no reflection and no client deadline in the handler. The
ingress binds the host it is given, serves exactly what the single-process server serves, and passes each
client's deadline on to the engine. Serve still routes, load-balances and autoscales the model replicas, because
the ingress calls them through a handle.

Environment: JAMBA_MODEL_DIR overrides the `model` argument (KubeRay mounts the weights from a volume there),
JAMBA_ADAPTERS_DIR the `adapters` directory (LoRA adapters in `<dir>/<name>/`, served by in-process replicas,
`layer_groups: 0`), JAMBA_SERVE_HOST the ingress's `host` (0.0.0.0 in a pod, so that the Service reaches it), and
JAMBA_SERVE_TOKEN the bearer token the ingress requires.
"""

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve

from jamba.model import default_model_dir
from jamba.tokenizer import Tokenizer
from serve.engine import Engine, EngineConfig
from serve.runner import ModelSummary
from serve.validation import GenerationRequest, Limits

log = logging.getLogger(__name__)


def _model_dir(model: str | None) -> Path:
    return Path(os.environ.get("JAMBA_MODEL_DIR") or model or default_model_dir())


@dataclass(frozen=True)
class ReplicaInfo:
    """The model facts the ingress validates requests against and reports in GetModelInfo, fetched once."""

    summary: ModelSummary
    limits: Limits
    num_slots: int
    max_queue_size: int


@serve.deployment(ray_actor_options={"num_cpus": 0})
class JambaDeployment:
    """A continuous-batching engine over one model replica; called through a handle by `GrpcIngress`."""

    def __init__(self, model: str | None = None, layer_groups: int = 2, expert_shards: int = 2, slots: int = 16,
                 max_len: int = 512, transport: str = "collective", queue_size: int = 64,
                 cpus_per_actor: float = 1.0, threads_per_actor: int | None = None, adapters: str | None = None,
                 shared_memory: bool = True, load_timeout_s: float = 600.0):
        from cluster.replica import RayReplica
        from serve.runner import LocalRunner

        model_dir = _model_dir(model)
        adapters_dir = os.environ.get("JAMBA_ADAPTERS_DIR") or adapters
        if adapters_dir and not any(Path(adapters_dir).glob("*/adapter_config.json")):
            log.warning("no adapter in %s yet: serving the base model only", adapters_dir)
            adapters_dir = None
        if layer_groups == 0:
            from jamba.model import Jamba

            runner = LocalRunner(Jamba.from_pretrained(model_dir), num_slots=slots, max_len=max_len,
                                 name=model_dir.name, adapters_dir=adapters_dir)
        else:
            if adapters_dir:
                raise NotImplementedError(
                    f"adapters ({adapters_dir}) are served by in-process replicas only: set layer_groups: 0, or "
                    "merge the adapter into a checkpoint with `python -m finetune.merge` and serve that")
            runner = RayReplica(model_dir, num_slots=slots, max_len=max_len, layer_groups=layer_groups,
                                expert_shards=expert_shards, transport=transport, cpus_per_actor=cpus_per_actor,
                                threads_per_actor=threads_per_actor, name=model_dir.name, shared_memory=shared_memory,
                                load_timeout_s=load_timeout_s)
        self.engine = Engine(runner, Tokenizer.from_file(model_dir), EngineConfig(max_queue_size=queue_size))
        self._started = False
        log.info("model replica ready: %s, %d slots of %d tokens, torch %s", model_dir, slots, max_len,
                 torch.__version__)

    def _start(self) -> None:
        if not self._started:
            self.engine.start()
            self._started = True

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(self.engine.runner.summary, self.engine.limits, self.engine.runner.num_slots,
                           self.engine.config.max_queue_size)

    def stats(self) -> dict[str, int]:
        return {"free_slots": self.engine.num_free_slots, "running": self.engine.num_running,
                "waiting": self.engine.num_waiting}

    async def generate(self, request: GenerationRequest, timeout_s: float | None):
        """Yield the engine's chunks for a validated request; errors reach the caller as raised here."""
        self._start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        async for chunk in self.engine.generate(request, deadline):
            yield chunk


class RemoteEngine:
    """The engine interface `serve/server.py` needs, over a handle to `JambaDeployment`.

    Validation runs here with the replicas' limits and the tokenizer, so bad requests never reach a model replica.
    """

    def __init__(self, handle, tokenizer: Tokenizer, info: ReplicaInfo):
        self.handle = handle.options(stream=True)
        self.tokenizer = tokenizer
        self.limits = info.limits
        self.config = EngineConfig(max_queue_size=info.max_queue_size)
        self.runner = info  # JambaServicer reads runner.summary and runner.num_slots
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_running(self) -> int:
        return self._in_flight

    num_waiting = 0

    def start(self) -> None:
        pass

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        pass

    async def generate(self, request: GenerationRequest, deadline: float | None = None):
        from serve.validation import Draining

        if self.draining:
            raise Draining("the server is shutting down and accepts no new requests")
        timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._in_flight += 1
        self._idle.clear()
        try:
            async for chunk in self.handle.generate.remote(request, timeout_s):
                yield chunk
        except Exception as error:
            # Serve wraps a replica's exception; its cause is the error the client should see.
            raise getattr(error, "cause", None) or error from None
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()


# A CPU request above zero keeps the ingress off a KubeRay head that offers Ray no CPUs, and so inside the Service.
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class GrpcIngress:
    """The gRPC front: the server of `serve/server.py` on host:port, forwarding to `JambaDeployment`."""

    async def __init__(self, model_handle, model: str | None = None, host: str = "127.0.0.1", port: int = 9000,
                     grace_period_s: float = 30.0):
        from serve.server import create_server

        host = os.environ.get("JAMBA_SERVE_HOST") or host
        info = await model_handle.info.remote()
        engine = RemoteEngine(model_handle, Tokenizer.from_file(_model_dir(model)), info)
        self.server, self.port = create_server(f"{host}:{port}", engine, token=os.environ.get("JAMBA_SERVE_TOKEN"))
        await self.server.start()
        self.grace_period_s = grace_period_s
        log.info("gRPC ingress listening on %s:%d", host, self.port)

    def address(self) -> int:
        return self.port

    async def __del__(self):
        await self.server.stop(self.grace_period_s)


_MODEL_ARGS = {"model", "layer_groups", "expert_shards", "slots", "max_len", "transport", "queue_size",
               "cpus_per_actor", "threads_per_actor", "adapters", "shared_memory", "load_timeout_s"}
_INGRESS_ARGS = {"host", "port", "grace_period_s"}


def build_app(args: dict) -> serve.Application:
    """Build the application from the `args` of the Serve config (model args plus host/port of the ingress)."""
    unknown = sorted(set(args) - _MODEL_ARGS - _INGRESS_ARGS)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known args are {sorted(_MODEL_ARGS | _INGRESS_ARGS)}")
    model_args = {k: v for k, v in args.items() if k in _MODEL_ARGS}
    ingress_args = {k: v for k, v in args.items() if k in _INGRESS_ARGS}
    return GrpcIngress.bind(JambaDeployment.bind(**model_args), model=args.get("model"), **ingress_args)
