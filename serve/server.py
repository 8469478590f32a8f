"""The gRPC server: JambaService over a continuous-batching Engine, plus health checking and reflection.

    jamba-serve --model path/to/model --port 50051

Health: the standard grpc.health.v1 service reports SERVING for "" and "jamba.v1.JambaService" once started, and
NOT_SERVING from the start of a shutdown. It never requires the bearer token, so that probes can call it.

Shutdown (SIGTERM or SIGINT): the server stops admitting requests (UNAVAILABLE), lets the ones in flight finish for
up to the grace period, ends what is left with finish reason CANCELLED, then closes.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jamba.model import Jamba, default_model_dir
from jamba.tokenizer import Tokenizer
from serve.engine import Chunk, Engine, EngineConfig, FinishReason
from serve.metrics import Metrics
from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc
from serve.runner import LocalRunner, serving_threads, slots_for_memory
from serve.validation import ServeError, grpc_status, validate_generate, validate_tokenize

logger = logging.getLogger(__name__)

SERVICE_NAME = jamba_pb2.DESCRIPTOR.services_by_name["JambaService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_FINISH_REASONS = {
    FinishReason.LENGTH: jamba_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: jamba_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.END_OF_SEQUENCE: jamba_pb2.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.CANCELLED: jamba_pb2.FINISH_REASON_CANCELLED,
}


class JambaServicer(jamba_pb2_grpc.JambaServiceServicer):
    """The RPC handlers: validate, run on the engine, and map every error through `grpc_status`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Generate(self, request: jamba_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        text, token_ids, last = [], [], None
        try:
            generation = validate_generate(request, self.engine.limits, self.engine.tokenizer)
            async for chunk in self.engine.generate(generation, _deadline(context)):
                text.append(chunk.text)
                token_ids.extend(chunk.token_ids)
                last = chunk
        except Exception as error:  # every error reaches the client through grpc_status
            await _abort(context, error, request.request_id)
        return jamba_pb2.GenerateResponse(
            text="".join(text),
            token_ids=token_ids,
            finish_reason=_FINISH_REASONS[last.finish_reason],
            usage=_usage(last),
        )

    async def GenerateStream(
        self, request: jamba_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jamba_pb2.GenerateStreamResponse]:
        try:
            generation = validate_generate(request, self.engine.limits, self.engine.tokenizer)
            async for chunk in self.engine.generate(generation, _deadline(context)):
                message = jamba_pb2.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids)
                if chunk.finish_reason is not None:
                    message.finish_reason = _FINISH_REASONS[chunk.finish_reason]
                    message.usage.CopyFrom(_usage(chunk))
                yield message
        except Exception as error:  # every error reaches the client through grpc_status
            await _abort(context, error, request.request_id)

    async def GetModelInfo(self, request: jamba_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        summary = self.engine.runner.summary
        limits = self.engine.limits
        tokenizer = self.engine.tokenizer
        return jamba_pb2.ModelInfo(
            model_name=summary.name,
            vocab_size=limits.vocab_size,
            max_context_length=limits.max_context_length,
            max_new_tokens_limit=limits.max_new_tokens_limit,
            num_slots=self.engine.runner.num_slots,
            max_queue_size=self.engine.config.max_queue_size,
            hidden_size=summary.hidden_size,
            num_hidden_layers=summary.num_hidden_layers,
            num_attention_layers=summary.num_attention_layers,
            num_mamba_layers=summary.num_mamba_layers,
            num_experts=summary.num_experts,
            num_experts_per_tok=summary.num_experts_per_tok,
            adapters=limits.adapters,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=tokenizer.bos_id,
            pad_token_id=tokenizer.pad_id,
        )

    async def Tokenize(self, request: jamba_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        try:
            text = validate_tokenize(request, self.engine.limits)
        except Exception as error:  # every error reaches the client through grpc_status
            await _abort(context, error, "")
        return jamba_pb2.TokenizeResponse(token_ids=self.engine.tokenizer.encode_prompt(text))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _usage(chunk: Chunk) -> jamba_pb2.Usage:
    return jamba_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)


async def _abort(context: grpc.aio.ServicerContext, error: Exception, request_id: str) -> None:
    code, message = grpc_status(error)
    if isinstance(error, ServeError):
        logger.info("request %s failed with %s: %s", request_id or "-", code.name, message)
    else:
        logger.error("request %s failed with %s", request_id or "-", code.name, exc_info=error)
    await context.abort(code, message)


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` metadata with UNAUTHENTICATED, except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        provided = metadata.get("authorization", "")
        provided = provided.encode() if isinstance(provided, str) else provided
        if hmac.compare_digest(provided, self._expected):
            return handler
        logger.info("rejected %s: missing or wrong bearer token", handler_call_details.method)
        return _unauthenticated_handler(handler)


def _unauthenticated_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same RPC kind as `handler` that aborts with UNAUTHENTICATED."""

    async def reject(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def reject_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # unreachable: makes this an async generator, the form of a server-streaming handler

    kwargs = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(reject, **kwargs)


class JambaServer:
    """A started-or-not gRPC server with its engine and health service; see `create_server`."""

    def __init__(self, server: grpc.aio.Server, engine: Engine, health_servicer: health.aio.HealthServicer) -> None:
        self.grpc_server = server
        self.engine = engine
        self.health = health_servicer

    async def start(self) -> None:
        self.engine.start()
        await self.grpc_server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, timeout_s: float) -> bool:
        """Report NOT_SERVING and reject new requests, then wait up to timeout_s for the ones in flight.

        Returns whether every request finished in time.
        """
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine.start_draining()
        return await self.engine.wait_idle(timeout_s)

    async def stop(self, grace_s: float) -> None:
        """Drain for up to grace_s, end the remaining requests with CANCELLED and close the server."""
        if not await self.drain(grace_s):
            logger.warning(
                "grace period of %s s over: cancelling %s running and %s waiting requests",
                grace_s, self.engine.num_running, self.engine.num_waiting,
            )
        await self.engine.stop()
        # The cancelled requests' last messages are already queued; a short grace lets them reach the clients.
        await self.grpc_server.stop(grace=1.0)
        logger.info("server stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


def create_server(
    address: str,
    engine: Engine,
    *,
    token: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[JambaServer, int]:
    """Build a server for `engine` listening on `address` ("host:port", port 0 picks a free one).

    Returns the server, not yet started, and the bound port. With `token`, every call except health checks needs
    `authorization: Bearer <token>` metadata. With `tls_cert` and `tls_key` (PEM files) the port speaks TLS.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key file, got only one")
    interceptors = [_BearerTokenInterceptor(token)] if token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    jamba_pb2_grpc.add_JambaServiceServicer_to_server(JambaServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    if tls_cert is not None:
        credentials = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind the gRPC server to {address}")
    return JambaServer(server, engine, health_servicer), port


def load_engine(
    model_dir: Path,
    *,
    max_len: int,
    num_slots: int | None = None,
    memory_budget_bytes: int | None = None,
    config: EngineConfig = EngineConfig(),
    metrics: Metrics | None = None,
    device: str = "cpu",
    adapters_dir: Path | None = None,
) -> Engine:
    """Load a checkpoint directory (config.json, weights, tokenizer.json) into an Engine over a LocalRunner.

    Give either num_slots or memory_budget_bytes, from which the number of slots is computed.
    """
    if (num_slots is None) == (memory_budget_bytes is None):
        raise ValueError("give exactly one of num_slots and memory_budget_bytes")
    model = Jamba.from_pretrained(model_dir, device=device).eval()
    tokenizer = Tokenizer.from_file(model_dir)
    if num_slots is None:
        num_slots = slots_for_memory(model, max_len, memory_budget_bytes)
    logger.info("loaded %s on %s; the engine steps on %s threads", model_dir, device,
                config.threads or torch.get_num_threads())
    runner = LocalRunner(model, num_slots=num_slots, max_len=max_len, name=Path(model_dir).name,
                         adapters_dir=adapters_dir)
    return Engine(runner, tokenizer, config, metrics)


_SIZE_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(text: str) -> int:
    """Parse a size such as 512MiB, 2GiB, 1.5GB or 1048576 into bytes."""
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number):].upper()
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a number with B, KiB, MiB, GiB, KB, MB or GB")
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: {number!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return int(value)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jamba-serve", description="Serve a Jamba model over gRPC.")
    parser.add_argument("--model", type=Path, default=default_model_dir(),
                        help="checkpoint directory with config.json, weights and tokenizer.json "
                             "(default: the small model shipped in the package)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: %(default)s)")
    parser.add_argument("--adapters", type=Path, default=os.environ.get("JAMBA_ADAPTERS_DIR"),
                        help="directory of LoRA adapters, one peft adapter folder per name; requests pick one by "
                             "name (default: $JAMBA_ADAPTERS_DIR, else none)")
    slots = parser.add_mutually_exclusive_group()
    slots.add_argument("--slots", type=int, help="cache slots, the number of requests generating at once (default: 8)")
    slots.add_argument("--memory-budget", type=parse_bytes,
                       help="cache memory to size the slot pool from, such as 4GiB (instead of --slots)")
    parser.add_argument("--max-len", type=int, default=2048,
                        help="context length per request, prompt and output tokens together (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=64,
                        help="requests that may wait for a slot before RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--default-max-new-tokens", type=int, default=64,
                        help="max_new_tokens of requests that leave it unset (default: %(default)s)")
    parser.add_argument("--max-new-tokens-limit", type=int,
                        help="largest max_new_tokens a request may ask for (default: max-len minus 1)")
    parser.add_argument("--max-message-bytes", type=parse_bytes, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest request message accepted (default: 4MiB)")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds a shutdown waits for requests in flight (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port of 127.0.0.1 (default: off)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; enables TLS together with --tls-key")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the bearer token clients must send; the JAMBA_SERVE_TOKEN environment "
                             "variable is the alternative (default: no authentication)")
    parser.add_argument("--threads", type=int, default=serving_threads(),
                        help="torch threads of the engine's model steps (default: the usable cores, here "
                             "%(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.slots is None and args.memory_budget is None:
        args.slots = 8
    if args.slots is not None and args.slots < 1:
        parser.error(f"--slots must be at least 1, got {args.slots}")
    if args.max_len < 2:
        parser.error(f"--max-len must be at least 2, got {args.max_len}")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model: no config.json in {args.model}")
    return args


async def _serve(args: argparse.Namespace) -> None:
    token = None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    elif os.environ.get("JAMBA_SERVE_TOKEN"):
        token = os.environ["JAMBA_SERVE_TOKEN"]

    # OpenMP (libgomp) keeps one pool of threads per thread that starts parallel regions. Once it manages more
    # threads than there are cores, its threads sleep between regions instead of spinning. Each region then waits
    # for them to wake up: a 32-row decode step of the bench model took 7.3 ms instead of 5.2 on 2 cores. So only
    # the engine's step thread computes on several threads, and this one loads the model on one.
    torch.set_num_threads(1)
    metrics = Metrics()
    config = EngineConfig(
        max_queue_size=args.queue_size,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        threads=args.threads,
    )
    try:
        engine = load_engine(
            args.model, max_len=args.max_len, num_slots=args.slots, memory_budget_bytes=args.memory_budget,
            config=config, metrics=metrics, device=args.device, adapters_dir=args.adapters,
        )
    except ValueError as error:
        raise SystemExit(f"jamba-serve: {error}") from None
    server, port = create_server(
        f"{args.host}:{args.port}", engine, token=token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, max_message_bytes=args.max_message_bytes,
    )
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)
    await server.start()
    logger.info(
        "serving %s on %s:%s (%s, %s): %s slots of %s tokens, queue of %s", args.model, args.host, port,
        "TLS" if args.tls_cert else "plaintext", "bearer token" if token else "no authentication",
        engine.runner.num_slots, args.max_len, args.queue_size,
    )

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    logger.info("shutdown requested: draining for up to %s s", args.grace_period)
    await server.stop(args.grace_period)
    metrics.close()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
