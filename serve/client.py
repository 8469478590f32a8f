"""Command-line client: send a prompt to a jamba-serve server and stream the answer to stdout.

    jamba-client --target 127.0.0.1:50051 "12+34="

The finish reason and token counts go to stderr, so stdout contains the generated text only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc


def build_request(args: argparse.Namespace) -> jamba_pb2.GenerateRequest:
    request = jamba_pb2.GenerateRequest(adapter=args.adapter or "")
    if args.token_ids:
        request.token_ids.ids.extend(int(i) for i in args.prompt.split(","))
    else:
        request.text = args.prompt
    sampling = request.sampling
    if args.max_new_tokens is not None:
        sampling.max_new_tokens = args.max_new_tokens
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    sampling.top_k = args.top_k
    if args.seed is not None:
        sampling.seed = args.seed
    sampling.stop.extend(args.stop)
    return request


def open_channel(target: str, tls_ca: Path | None, tls: bool) -> grpc.Channel:
    if tls_ca is not None or tls:
        root_certificates = tls_ca.read_bytes() if tls_ca is not None else None
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
    return grpc.insecure_channel(target)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jamba-client", description="Stream a completion from a jamba-serve server.")
    parser.add_argument("prompt", help="prompt text, or comma-separated token ids with --token-ids")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address host:port (default: %(default)s)")
    parser.add_argument("--token-ids", action="store_true", help="read the prompt as comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default: the server's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: 1)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 is off")
    parser.add_argument("--seed", type=int, help="seed of the request's random generator")
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeat the flag for several)")
    parser.add_argument("--adapter", help="LoRA adapter name (default: the base model)")
    parser.add_argument("--timeout", type=float, help="deadline of the call in seconds (default: none)")
    parser.add_argument("--token", help="bearer token; the JAMBA_SERVE_TOKEN environment variable is the default")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--tls-ca", type=Path, help="use TLS and trust this PEM CA certificate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        request = build_request(args)
    except ValueError as error:
        print(f"jamba-client: invalid --token-ids prompt {args.prompt!r}: {error}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("JAMBA_SERVE_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else None

    with open_channel(args.target, args.tls_ca, args.tls) as channel:
        stub = jamba_pb2_grpc.JambaServiceStub(channel)
        try:
            for message in stub.GenerateStream(request, timeout=args.timeout, metadata=metadata):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.finish_reason != jamba_pb2.FINISH_REASON_UNSPECIFIED:
                    reason = jamba_pb2.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_")
                    print(
                        f"\n[{reason.lower()}: {message.usage.prompt_tokens} prompt tokens, "
                        f"{message.usage.completion_tokens} generated]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as error:
            print(f"\njamba-client: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
