"""Prometheus metrics of the server and of the distributed KV (prometheus_client).

vLLM's metric names under the `distkv:` prefix, plus what only a mesh-wide
KV shows: blocks lent between instances (the gManager's debt ledger),
blocks borrowed per instance, migrated and swapped blocks, host-tier use and
the most instances one request's KV spans.

Request latencies are observed by the HTTP side as outputs reach it. Engine
state and counters are read from the engine's own snapshot
(AsyncLLM.stats(), taken on the engine thread between steps) each time
/metrics is scraped, so they are never torn by a step in progress.
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "distkv:"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class _EngineCollector:
    """Engine gauges and counters, from a fresh snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], Optional[dict]], model_name: str):
        self.snapshot, self.model_name = snapshot, model_name

    def describe(self):
        return []  # collected lazily: the engine may not be up at registration

    def collect(self):
        s = self.snapshot()
        if s is None:
            return
        m = [self.model_name]

        def gauge(name, doc, value, labels=(), label_values=()):
            g = GaugeMetricFamily(P + name, doc, labels=["model_name", *labels])
            g.add_metric(m + list(label_values), value)
            return g

        yield gauge("num_requests_running", "Requests running (KV on devices).", s["num_running"])
        yield gauge("num_requests_waiting", "Requests waiting to be admitted.", s["num_waiting"])
        waiting = GaugeMetricFamily(P + "num_requests_waiting_by_class",
                                    "Requests waiting to be admitted, by class at arrival (long: "
                                    "prompt over long_prefill_token_threshold).",
                                    labels=["model_name", "request_class"])
        for c, n in s["num_waiting_by_class"].items():
            waiting.add_metric(m + [c], n)
        yield waiting
        c = CounterMetricFamily(P + "long_prefill_steps", "Engine steps that ran a chunk of a "
                                "long prefill.", labels=["model_name"])
        c.add_metric(m, s["long_prefill_steps"])
        yield c
        yield gauge("kv_blocks_reserved", "KV blocks per instance a long request's growth leaves "
                    "free for short requests (short_reserve_blocks).", s["kv_blocks_reserved"])
        yield gauge("compiled_programs", "XLA programs compiled (or loaded from the compilation "
                    "cache) so far: step shapes and KV copy batches.", s["compiled_programs"])
        yield gauge("num_requests_swapped", "Requests whose KV is swapped to host memory.",
                    s["num_swapped"])
        usage = GaugeMetricFamily(P + "kv_cache_usage_perc",
                                  "Fraction of each instance's device KV blocks in use (0-1).",
                                  labels=["model_name", "instance"])
        borrowed = GaugeMetricFamily(P + "kv_blocks_borrowed",
                                     "Device KV blocks of other instances held by requests "
                                     "homed on this instance.", labels=["model_name", "instance"])
        host = GaugeMetricFamily(P + "host_kv_cache_usage_perc",
                                 "Fraction of each instance's host-tier KV blocks in use (0-1).",
                                 labels=["model_name", "instance"])
        host_used = GaugeMetricFamily(P + "host_kv_blocks_used",
                                      "Host-tier KV blocks in use per instance.",
                                      labels=["model_name", "instance"])
        for i, u in enumerate(s["kv_usage"]):
            usage.add_metric(m + [str(i)], u)
            borrowed.add_metric(m + [str(i)], s["borrowed"][i])
            used = s["host_blocks_used"][i]
            host_used.add_metric(m + [str(i)], used)
            total = s["host_blocks_per_instance"]
            host.add_metric(m + [str(i)], used / total if total else 0.0)
        yield usage
        yield borrowed
        yield host
        yield host_used
        lent = GaugeMetricFamily(P + "kv_blocks_lent",
                                 "Device KV blocks of instance `creditor` held by requests homed "
                                 "on instance `debtor` (the gManager's debt ledger).",
                                 labels=["model_name", "creditor", "debtor"])
        for d, row in enumerate(s["ledger"]):
            for c, n in enumerate(row):
                if c != d:
                    lent.add_metric(m + [str(c), str(d)], n)
        yield lent
        yield gauge("max_request_instances",
                    "The most instances whose blocks one running request's KV spans now.",
                    s["max_request_instances"])
        queries = CounterMetricFamily(
            P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache, by the "
            "instance of the querying request.", labels=["model_name", "instance"])
        hits = CounterMetricFamily(
            P + "prefix_cache_hits", "Prompt tokens found in the prefix cache, by the instance "
            "of the querying request; scope=local: blocks held by that instance, remote: blocks "
            "held by another instance and read in place.",
            labels=["model_name", "instance", "scope"])
        cached = GaugeMetricFamily(P + "prefix_cache_blocks", "Evictable prefix-cache blocks "
                                   "(no reader) per instance.", labels=["model_name", "instance"])
        evicted = CounterMetricFamily(P + "prefix_cache_evictions", "Prefix-cache blocks evicted "
                                      "to make room, per instance.", labels=["model_name", "instance"])
        for i, q in enumerate(s["prefix_cache_queries"]):
            queries.add_metric(m + [str(i)], q)
            remote = s["prefix_cache_hits_remote"][i]
            hits.add_metric(m + [str(i), "local"], s["prefix_cache_hits"][i] - remote)
            hits.add_metric(m + [str(i), "remote"], remote)
            cached.add_metric(m + [str(i)], s["prefix_cache_blocks"][i])
            evicted.add_metric(m + [str(i)], s["prefix_cache_evictions"][i])
        yield queries
        yield hits
        yield cached
        yield evicted
        reclaimed = CounterMetricFamily(
            P + "kv_reclaimed_blocks", "Lent KV blocks taken back by their instance (the "
            "creditor) for its own requests; how=moved: the borrower's data moved elsewhere, "
            "offloaded: moved to the host tier (host-attended), preempted: the borrower was "
            "preempted.", labels=["model_name", "instance", "how"])
        for i, n in enumerate(s["kv_reclaimed_moved"]):
            reclaimed.add_metric(m + [str(i), "moved"], n)
            reclaimed.add_metric(m + [str(i), "offloaded"], s["kv_reclaimed_offloaded"][i])
            reclaimed.add_metric(m + [str(i), "preempted"], s["kv_reclaimed_preempted"][i])
        yield reclaimed
        attended = GaugeMetricFamily(
            P + "kv_host_attended_blocks", "KV blocks of running requests held in host memory "
            "and attended there by the host CPU, by the instance whose host pool holds them.",
            labels=["model_name", "instance"])
        offload = CounterMetricFamily(
            P + "kv_host_offloaded_blocks", "Full KV blocks of running requests copied to host "
            "memory to be attended there (direction=offloaded), or back to device memory "
            "(direction=brought_back), by host pool instance.",
            labels=["model_name", "instance", "direction"])
        for i, n in enumerate(s["kv_host_attended_blocks"]):
            attended.add_metric(m + [str(i)], n)
            offload.add_metric(m + [str(i), "offloaded"], s["kv_offloaded_blocks"][i])
            offload.add_metric(m + [str(i), "brought_back"], s["kv_brought_back_blocks"][i])
        yield attended
        yield offload
        st = s["stats"]
        for name, key, doc in (
                ("num_preemptions", "preemptions", "Requests preempted (host swap or recompute)."),
                ("prompt_tokens", "prompt_tokens", "Prompt tokens of finished requests."),
                ("generation_tokens", "generation_tokens", "Tokens generated."),
                ("kv_migrated_blocks", "migrated_blocks",
                 "KV blocks migrated between instances."),
                ("kv_swapped_out_blocks", "swapped_out_blocks", "KV blocks copied device -> host."),
                ("kv_swapped_in_blocks", "swapped_in_blocks", "KV blocks copied host -> device."),
                ("engine_steps", "steps", "Engine steps that ran the model.")):
            c = CounterMetricFamily(P + name, doc, labels=["model_name"])
            c.add_metric(m, st[key])
            yield c


class ServerMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], Optional[dict]]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def hist(name, doc):
            return Histogram(P + name, doc, labels, registry=self.registry,
                             buckets=_LATENCY_BUCKETS).labels(model_name)

        def by_class(name, doc):
            return Histogram(P + name, doc, labels + ["request_class"], registry=self.registry,
                             buckets=_LATENCY_BUCKETS)

        self._ttft = by_class("time_to_first_token_seconds", "Time to the first generated token, "
                              "by request class at arrival (short / long).")
        self.itl = hist("inter_token_latency_seconds", "Time between generated tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "Request latency, arrival to last token.")
        self._queue = by_class("request_queue_time_seconds", "Time a request waited before it "
                               "was first scheduled, by request class at arrival (short / long).")
        self._success = Counter(P + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(snapshot, model_name))

    def observe_ttft(self, seconds: float, out) -> None:
        self._ttft.labels(self.model_name, _request_class(out)).observe(seconds)

    def finished(self, reason: str | None, out) -> None:
        self._success.labels(self.model_name, reason or "unknown").inc()
        if out is None:
            return
        m = out.metrics
        if m.first_scheduled_time is not None and m.arrival_time is not None:
            self._queue.labels(self.model_name, _request_class(out)).observe(
                max(0.0, m.first_scheduled_time - m.arrival_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _request_class(out) -> str:
    """The class an output's request had at arrival (every request the
    scheduler took has one)."""
    return out.metrics.request_class or "short"
