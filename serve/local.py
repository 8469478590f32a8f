"""Run the Ray Serve application on a local Ray cluster and answer a first question: what `make run` does.

    python -m serve.local [--config serve/serve_config.yaml] [--prompt "123+456="]

It starts Ray on this machine with every listener on 127.0.0.1, deploys the Serve config with `serve run`'s own
code, waits until the gRPC health check reports SERVING, sends the prompt with Generate and prints the answer, then
keeps serving until interrupted. Try it from another terminal with `jamba-client` or grpcurl (see the README).
"""

import argparse
import logging
import os
import time
from pathlib import Path

import grpc
import yaml

CONFIG = Path(__file__).with_name("serve_config.yaml")


def wait_until_serving(target: str, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service at {target} is not serving after {timeout_s} s: "
                                       f"{error.code().name}") from error
            time.sleep(1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="Ray Serve config file")
    parser.add_argument("--prompt", default="382+519=", help="question sent once the service is up")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the service to start")
    parser.add_argument("--exit", action="store_true", help="stop after the first response instead of serving on")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Ray reads this when imported: it keeps the cluster's listeners on 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.serve.scripts import run as serve_run

    from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc

    args = yaml.safe_load(options.config.read_text())["applications"][0]["args"]
    target = f"{args.get('host', '127.0.0.1')}:{args.get('port', 9000)}"
    # Actor logs stay in the session directory (/tmp/ray/session_latest/logs) instead of flooding the terminal.
    # Ray counts CPUs logically: 4 leave room for the ingress and two model replicas (1 CPU each, see the config)
    # on any machine, so that autoscaling can add the second one.
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    try:
        serve_run.main([str(options.config), "--non-blocking"], standalone_mode=False)
        wait_until_serving(target, options.timeout)

        with grpc.insecure_channel(target) as channel:
            request = jamba_pb2.GenerateRequest(text=options.prompt,
                                                sampling=jamba_pb2.SamplingParams(max_new_tokens=16))
            answer = jamba_pb2_grpc.JambaServiceStub(channel).Generate(request, timeout=60)
        print(f"\nGenerate({options.prompt!r}) -> {answer.text!r} "
              f"[{jamba_pb2.FinishReason.Name(answer.finish_reason)}]\n", flush=True)
        if options.exit:
            return
        print(f"serving JambaService on {target}; press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
