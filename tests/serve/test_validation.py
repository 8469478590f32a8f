import math

import grpc
import pytest

from serve.proto.jamba.v1 import jamba_pb2
from serve.validation import (
    DeadlineExceeded, Draining, InvalidArgument, Limits, Overloaded, Unsupported, grpc_status, validate_generate,
)

LIMITS = Limits(vocab_size=300, max_context_length=32, max_new_tokens_limit=16, default_max_new_tokens=8,
                max_stop_sequences=2, max_stop_length=5, adapters=("math",))


def request(text="12+3=", token_ids=None, **sampling) -> jamba_pb2.GenerateRequest:
    stop = sampling.pop("stop", [])
    adapter = sampling.pop("adapter", "")
    message = jamba_pb2.GenerateRequest(sampling=jamba_pb2.SamplingParams(**sampling, stop=stop), adapter=adapter)
    if token_ids is not None:
        message.token_ids.ids.extend(token_ids)
    elif text is not None:
        message.text = text
    return message


# (request, field named in the message, a fragment of the message)
BAD_REQUESTS = {
    "no prompt": (request(text=None), "prompt", "neither"),
    "empty text": (request(text=""), "text", "empty"),
    "empty token ids": (request(token_ids=[]), "token_ids", "empty"),
    "prompt too long": (request(token_ids=[5] * 32), "token_ids", "maximum is 31"),
    "text too long": (request(text="1" * 40), "text", "maximum is 31"),
    "token id too large": (request(token_ids=[5, 300]), "token_ids", "[0, 300)"),
    "negative token id": (request(token_ids=[-1]), "token_ids", "token id -1"),
    "max_new_tokens zero": (request(max_new_tokens=0), "sampling.max_new_tokens", "[1, 16]"),
    "max_new_tokens over limit": (request(max_new_tokens=17), "sampling.max_new_tokens", "17 is outside"),
    "negative temperature": (request(temperature=-0.5), "sampling.temperature", "-0.5"),
    "nan temperature": (request(temperature=math.nan), "sampling.temperature", "nan"),
    "infinite temperature": (request(temperature=math.inf), "sampling.temperature", "inf"),
    "top_p zero": (request(top_p=0.0), "sampling.top_p", "(0, 1]"),
    "top_p above one": (request(top_p=1.5), "sampling.top_p", "1.5"),
    "top_p nan": (request(top_p=math.nan), "sampling.top_p", "nan"),
    "negative top_k": (request(top_k=-3), "sampling.top_k", "-3"),
    "too many stop sequences": (request(stop=["a", "b", "c"]), "sampling.stop", "maximum is 2"),
    "empty stop sequence": (request(stop=[""]), "sampling.stop[0]", "[1, 5]"),
    "stop sequence too long": (request(stop=["ok", "toolong"]), "sampling.stop[1]", "length 7"),
    "unknown adapter": (request(adapter="poetry"), "adapter", "'poetry'"),
    "request id too long": (jamba_pb2.GenerateRequest(text="1", request_id="x" * 129), "request_id", "129"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_names_field(case, tokenizer):
    message, field_name, fragment = BAD_REQUESTS[case]
    with pytest.raises(InvalidArgument) as raised:
        validate_generate(message, LIMITS, tokenizer)
    assert raised.value.field_name == field_name
    assert str(raised.value).startswith(f"{field_name}: ")
    assert fragment in str(raised.value)
    assert grpc_status(raised.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_defaults_applied(tokenizer):
    validated = validate_generate(request(text="12+3="), LIMITS, tokenizer)
    assert validated.prompt_ids == tuple(tokenizer.encode_prompt("12+3="))
    assert validated.max_new_tokens == 8
    assert validated.sampling.temperature == 0.0
    assert validated.sampling.top_p == 1.0
    assert validated.sampling.top_k == 0
    assert validated.sampling.seed is None
    assert validated.adapter is None
    assert len(validated.request_id) == 32


def test_valid_fields_kept(tokenizer):
    validated = validate_generate(
        request(token_ids=[1, 5, 299], max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=5, seed=2**63,
                stop=["=", "abcde"], adapter="math"),
        LIMITS, tokenizer,
    )
    assert validated.prompt_ids == (1, 5, 299)
    assert validated.max_new_tokens == 16
    assert validated.sampling.temperature == pytest.approx(0.7)
    assert validated.sampling.top_p == pytest.approx(0.9)
    assert validated.sampling.top_k == 5
    assert validated.sampling.seed == 2**63
    assert validated.stop == ("=", "abcde")
    assert validated.adapter == "math"


@pytest.mark.parametrize("error, code", [
    (InvalidArgument("text", "empty"), grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining("draining"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unsupported("no"), grpc.StatusCode.UNIMPLEMENTED),
    (RuntimeError("model crashed"), grpc.StatusCode.INTERNAL),
])
def test_grpc_status_mapping(error, code):
    mapped_code, message = grpc_status(error)
    assert mapped_code == code
    assert str(error) in message
