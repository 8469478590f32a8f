"""Request validation and the mapping of serving errors to gRPC status codes.

Every field of a request is checked here, before the engine receives it, and every error the server returns goes
through `grpc_status`, so each failure has one status code wherever it is raised.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

import grpc

from serve.proto.jamba.v1 import jamba_pb2


class ServeError(Exception):
    """Base of the errors a request can end with. `grpc_status` maps each subclass to a status code."""


class InvalidArgument(ServeError):
    """A request field is out of its allowed range."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


class Overloaded(ServeError):
    """Every cache slot is in use and the waiting queue is full."""


class Draining(ServeError):
    """The server is shutting down and accepts no new requests."""


class DeadlineExceeded(ServeError):
    """The request's deadline passed before generation finished."""


class Unsupported(ServeError):
    """The request needs a feature this server does not implement."""


MAX_REQUEST_ID_LENGTH = 128

_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Draining: grpc.StatusCode.UNAVAILABLE,
    # The model's processes are gone (cluster.replica.ReplicaFailure): a retry may reach a rebuilt replica.
    ConnectionError: grpc.StatusCode.UNAVAILABLE,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
}


def grpc_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """Map an error raised while serving a request to the status code and message the client receives."""
    for error_type, code in _STATUS_CODES.items():
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on requests, checked by `validate_generate`."""

    vocab_size: int
    max_context_length: int  # prompt and generated tokens together
    max_new_tokens_limit: int
    default_max_new_tokens: int = 64
    max_stop_sequences: int = 8
    max_stop_length: int = 64  # characters
    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_context_length < 2:
            raise ValueError(f"max_context_length must be at least 2, got {self.max_context_length}")
        if not 1 <= self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens_limit must be at least 1, got {self.max_new_tokens_limit}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens must be in [1, {self.max_new_tokens_limit}], "
                f"got {self.default_max_new_tokens}"
            )


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one request."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, in the form the engine takes."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    request_id: str = ""


def validate_generate(request: jamba_pb2.GenerateRequest, limits: Limits, tokenizer) -> GenerationRequest:
    """Check every field of a GenerateRequest and return the engine's request, or raise InvalidArgument.

    `tokenizer` is a `jamba.tokenizer.Tokenizer`. A text prompt gets the special tokens that the tokenizer's post
    processor adds; a token-id prompt is used as given, so a client that needs another prefix sends token ids.
    """
    prompt_kind = request.WhichOneof("prompt")
    if prompt_kind is None:
        raise InvalidArgument("prompt", "set exactly one of text or token_ids, got neither")
    if prompt_kind == "text":
        if not request.text:
            raise InvalidArgument("text", "the prompt is empty")
        prompt_ids = tuple(tokenizer.encode_prompt(request.text))
        prompt_field = "text"
    else:
        prompt_ids = tuple(request.token_ids.ids)
        prompt_field = "token_ids"
        if not prompt_ids:
            raise InvalidArgument("token_ids", "the prompt is empty")
        for position, token_id in enumerate(prompt_ids):
            if not 0 <= token_id < limits.vocab_size:
                raise InvalidArgument(
                    "token_ids",
                    f"token id {token_id} at position {position} is outside the vocabulary [0, {limits.vocab_size})",
                )
    max_prompt = limits.max_context_length - 1
    if len(prompt_ids) > max_prompt:
        raise InvalidArgument(
            prompt_field,
            f"the prompt is {len(prompt_ids)} tokens, the maximum is {max_prompt} "
            f"(context length {limits.max_context_length} minus one generated token)",
        )

    sampling = request.sampling
    max_new_tokens = limits.default_max_new_tokens
    if sampling.HasField("max_new_tokens"):
        max_new_tokens = sampling.max_new_tokens
        if not 1 <= max_new_tokens <= limits.max_new_tokens_limit:
            raise InvalidArgument(
                "sampling.max_new_tokens", f"{max_new_tokens} is outside [1, {limits.max_new_tokens_limit}]"
            )

    temperature = 0.0
    if sampling.HasField("temperature"):
        temperature = sampling.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(
                "sampling.temperature", f"{temperature} is invalid, expected a finite number >= 0 (0 is greedy)"
            )

    top_p = 1.0
    if sampling.HasField("top_p"):
        top_p = sampling.top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument("sampling.top_p", f"{top_p} is outside (0, 1]")

    if sampling.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"{sampling.top_k} is negative, expected >= 0 (0 is off)")

    seed = sampling.seed if sampling.HasField("seed") else None

    stop = tuple(sampling.stop)
    if len(stop) > limits.max_stop_sequences:
        raise InvalidArgument(
            "sampling.stop", f"{len(stop)} stop sequences given, the maximum is {limits.max_stop_sequences}"
        )
    for index, sequence in enumerate(stop):
        if not 1 <= len(sequence) <= limits.max_stop_length:
            raise InvalidArgument(
                f"sampling.stop[{index}]",
                f"length {len(sequence)} is outside [1, {limits.max_stop_length}] characters",
            )

    adapter = request.adapter or None
    if adapter is not None and adapter not in limits.adapters:
        available = ", ".join(limits.adapters) if limits.adapters else "none"
        raise InvalidArgument("adapter", f"unknown adapter {adapter!r}, available: {available}")

    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            "request_id", f"length {len(request.request_id)} is over the maximum of {MAX_REQUEST_ID_LENGTH} characters"
        )

    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature=temperature, top_k=sampling.top_k, top_p=top_p, seed=seed),
        stop=stop,
        adapter=adapter,
        request_id=request.request_id or uuid.uuid4().hex,
    )


def validate_tokenize(request: jamba_pb2.TokenizeRequest, limits: Limits) -> str:
    """Check a TokenizeRequest and return its text."""
    if not request.text:
        raise InvalidArgument("text", "the text is empty")
    return request.text
