"""Prometheus metrics of the serving engine, exported over HTTP on a separate port.

Each Metrics object has its own registry, so several servers can live in one process (as in tests).
"""

from __future__ import annotations

import logging

import prometheus_client
import torch

logger = logging.getLogger(__name__)

# Bucket edges in seconds: from a few milliseconds on a GPU to seconds on a CPU under load.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The engine's counters, gauges and histograms, all prefixed `jamba_`."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self._http_server = None
        r = self.registry
        self.time_to_first_token = prometheus_client.Histogram(
            "jamba_time_to_first_token_seconds", "Time from a request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.time_per_output_token = prometheus_client.Histogram(
            "jamba_time_per_output_token_seconds", "Time between two consecutive tokens of one request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.step_seconds = prometheus_client.Histogram(
            "jamba_step_seconds", "Duration of one model step, sampling included", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.generated_tokens = prometheus_client.Counter(
            "jamba_generated_tokens", "Tokens generated; its rate is the output throughput in tokens/s", registry=r,
        )
        self.prompt_tokens = prometheus_client.Counter(
            "jamba_prompt_tokens", "Prompt tokens prefilled", registry=r,
        )
        self.finished = prometheus_client.Counter(
            "jamba_requests_finished", "Requests that finished generating, by finish reason", ["reason"], registry=r,
        )
        self.rejected = prometheus_client.Counter(
            "jamba_requests_rejected", "Requests rejected because the slots and the queue were full", registry=r,
        )
        self.waiting = prometheus_client.Gauge(
            "jamba_queue_length", "Requests waiting for a cache slot", registry=r,
        )
        self.running = prometheus_client.Gauge(
            "jamba_running_requests", "Requests holding a cache slot", registry=r,
        )
        self.slots_in_use = prometheus_client.Gauge(
            "jamba_slots_in_use", "Cache slots not available to a new request (running or being reset)", registry=r,
        )
        self.slots_total = prometheus_client.Gauge(
            "jamba_slots", "Cache slots in the pool", registry=r,
        )
        self.expert_tokens = prometheus_client.Counter(
            "jamba_expert_tokens", "Tokens routed to each expert of each MoE layer (top-K choices)",
            ["moe_layer", "expert"], registry=r,
        )

    def observe_expert_load(self, load: torch.Tensor) -> None:
        """Add a (MoE layers, E) tensor of routed-token counts to the expert load."""
        for layer, row in enumerate(load.tolist()):
            for expert, count in enumerate(row):
                if count:
                    self.expert_tokens.labels(str(layer), str(expert)).inc(count)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter in a background thread and return its port (useful with port 0)."""
        server, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        bound_port = server.server_address[1]
        logger.info("metrics on http://%s:%s/metrics", host, bound_port)
        self._http_server = server
        return bound_port

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
