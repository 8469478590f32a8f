"""The Ray Serve application: JambaService behind Ray Serve's gRPC proxy, one model replica per Serve replica.

`serve run serve/serve_config.yaml` (or KubeRay's RayService, which embeds the same file) builds the application
with `build_app`. Each Serve replica owns a continuous-batching engine over a `cluster.replica.RayReplica`, whose
layer groups and expert shards are actors of their own, so Serve autoscaling on ongoing requests adds and removes
whole model replicas.

Why Serve's gRPC proxy and not a server of our own: the proxy gives request routing, autoscaling metrics and
replica health from Serve itself, and KubeRay exposes it as is. The handlers below reuse the servicer of
`serve/server.py`, so both servers validate and answer the same way. The standard grpc.health.v1 `Check` is routed
to the deployment like any other method and reports NOT_SERVING until the replica's actors are loaded.

Environment: JAMBA_MODEL_DIR overrides the `model` argument (KubeRay mounts the weights from a volume there).
"""

import asyncio
import logging
import os
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2
from ray import serve

from jamba.model import default_model_dir
from jamba.tokenizer import Tokenizer
from serve.engine import Engine, EngineConfig
from serve.server import JambaServicer

log = logging.getLogger(__name__)


class _Aborted(Exception):
    """Raised after the status code is set on Serve's gRPC context; the proxy sends that code to the client.

    It must propagate out of the handler: Serve turns a raised error into the status set on the context.
    """


class _ServeContext:
    """The part of grpc.aio's ServicerContext that JambaServicer uses, over Ray Serve's gRPC context."""

    def __init__(self, grpc_context):
        self._context = grpc_context

    def time_remaining(self):
        # The proxy enforces the client's deadline: it cancels the request, which frees the slot in the engine.
        return None

    async def abort(self, code: grpc.StatusCode, details: str):
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class JambaDeployment:
    def __init__(self, model: str | None = None, layer_groups: int = 2, expert_shards: int = 2, slots: int = 16,
                 max_len: int = 512, transport: str = "collective", queue_size: int = 64,
                 cpus_per_actor: float = 1.0, threads_per_actor: int | None = None):
        from cluster.replica import RayReplica
        from serve.runner import LocalRunner

        model_dir = Path(os.environ.get("JAMBA_MODEL_DIR") or model or default_model_dir())
        if layer_groups == 0:
            from jamba.model import Jamba

            runner = LocalRunner(Jamba.from_pretrained(model_dir), num_slots=slots, max_len=max_len,
                                 name=model_dir.name)
        else:
            runner = RayReplica(model_dir, num_slots=slots, max_len=max_len, layer_groups=layer_groups,
                                expert_shards=expert_shards, transport=transport, cpus_per_actor=cpus_per_actor,
                                threads_per_actor=threads_per_actor, name=model_dir.name)
        self.engine = Engine(runner, Tokenizer.from_file(model_dir), EngineConfig(max_queue_size=queue_size))
        self.servicer = JambaServicer(self.engine)
        self._started = False
        log.info("Jamba deployment ready: %s, %d slots of %d tokens, torch %s", model_dir, slots, max_len,
                 torch.__version__)

    def _start(self):
        if not self._started:
            self.engine.start()
            self._started = True

    async def _call(self, method, request, grpc_context):
        self._start()
        return await method(request, _ServeContext(grpc_context))

    async def Generate(self, request, grpc_context):
        return await self._call(self.servicer.Generate, request, grpc_context)

    async def GenerateStream(self, request, grpc_context):
        self._start()
        async for message in self.servicer.GenerateStream(request, _ServeContext(grpc_context)):
            yield message

    async def GetModelInfo(self, request, grpc_context):
        return await self._call(self.servicer.GetModelInfo, request, grpc_context)

    async def Tokenize(self, request, grpc_context):
        return await self._call(self.servicer.Tokenize, request, grpc_context)

    async def Check(self, request, grpc_context):
        """grpc.health.v1 Check: SERVING while the engine admits requests."""
        self._start()
        serving = not self.engine.draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, grpc_context):
        grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        grpc_context.set_details("Watch is not supported; poll Check instead")
        raise _Aborted("Watch is not supported")
        yield  # makes this a generator, as Serve expects for a server-streaming method

    def num_running(self) -> int:
        return self.engine.num_running

    async def __del__(self):
        if self._started:
            await asyncio.wait_for(self.engine.stop(), timeout=10)


def build_app(args: dict) -> serve.Application:
    """Build the application from the `args` of the Serve config."""
    known = {"model", "layer_groups", "expert_shards", "slots", "max_len", "transport", "queue_size",
             "cpus_per_actor", "threads_per_actor"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known args are {sorted(known)}")
    return JambaDeployment.bind(**args)
