"""Prometheus metrics of a node (`--metrics-listen HOST:PORT`, extra `p2pfl[metrics]`).

One general mechanism rather than counters sprinkled through the daemon: every scrape
turns the node's status snapshot (the same dict `p2pfl status` shows) into Prometheus
metric families, so whatever status knows, Prometheus and Grafana see, and the two can
never disagree. The exposition format is `prometheus-client`'s (`generate_latest` over a
registry holding this collector and the library's process collector).

Served by a tiny HTTP/1.0 responder on the node's own trio loop (no thread, unlike
`prometheus_client.start_http_server`): it reads one bounded request line, answers
`GET /metrics` and closes. A slow, malformed or hostile client costs at most a timeout
and never reaches the node's state except through the read-only status snapshot. Off by
default; a bare port means loopback. There is no authentication (as is usual for
exporters): bind to a loopback or management address.

Names follow Prometheus conventions: `p2pfl_` prefix, base units (seconds, bytes),
`_total` for counters, labels for the dimension (direction, state, reason, peer).
docs/operations.md lists them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import trio

from p2pfl.logs import event
from p2pfl.metrics import row_metrics
from p2pfl.wire.address import parse_address

log = logging.getLogger("p2pfl.metrics")

EXTRA_HINT = "pip install 'p2pfl[metrics]' (it installs prometheus-client)"
MAX_REQUEST_BYTES = 8192
IO_TIMEOUT = 5.0
# Round duration buckets (seconds): sub-second simulated rounds to minutes-long real ones.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

StatusFn = Callable[[], Mapping[str, Any]]


class MetricsUnavailable(ImportError):
    """`prometheus-client` is not installed; the message names the extra."""


def metrics_address(spec: str) -> tuple[str, int]:
    """`HOST:PORT` or a bare `PORT` (loopback) -> (host, port); ValueError otherwise."""
    text = spec.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return parse_address(text)


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class DurationHistogram:
    """Round durations, cumulative since the node started: fed from the status history
    (rows newer than the last one seen), so nothing in the daemon has to call us."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.last_round = -1

    def feed(self, history: Any) -> None:
        if not isinstance(history, list):
            return
        for row in history:
            if not isinstance(row, Mapping):
                continue
            r, seconds = row.get("round"), _num(row.get("seconds"))
            if not isinstance(r, int) or r <= self.last_round or seconds is None:
                continue
            self.last_round = r
            self.sum += seconds
            i = next((k for k, le in enumerate(self.buckets) if seconds <= le), len(self.buckets))
            self.counts[i] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for le, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            total += n
            out.append(("+Inf" if le == math.inf else repr(le), float(total)))
        return out


class StatusCollector:
    """A prometheus-client collector: one status snapshot -> metric families."""

    def __init__(self, status: StatusFn) -> None:
        self.status = status
        self.durations = DurationHistogram()

    def describe(self) -> list[Any]:
        return []  # no fixed set: families depend on what the node has on

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.status()
        node, rnd = s.get("node") or {}, s.get("round") or {}
        info = GaugeMetricFamily(
            "p2pfl_node_info",
            "The node's identity (value 1)",
            labels=["peer_id", "version", "protocol", "federation", "role"],
        )
        info.add_metric(
            [str(node.get(k, "")) for k in ("id", "version", "protocol", "federation", "role")],
            1.0,
        )
        yield info
        yield from _gauge(
            "p2pfl_uptime_seconds", "Seconds since the node started", node.get("uptime_s")
        )
        yield from _gauge("p2pfl_round", "The round the node is in", rnd.get("current"))
        yield from _gauge("p2pfl_rounds_target", "Rounds the node is to run", rnd.get("target"))
        yield from _gauge("p2pfl_round_peers_heard", "Models received this round", rnd.get("heard"))
        yield from _gauge(
            "p2pfl_round_peers_expected", "Models expected this round", rnd.get("expected")
        )
        phase = GaugeMetricFamily("p2pfl_phase", "The round phase (1 = current)", labels=["phase"])
        phase.add_metric([str(rnd.get("phase", "unknown"))], 1.0)
        yield phase

        raw_peers = s.get("peers")
        peers: list[Any] = raw_peers if isinstance(raw_peers, list) else []
        by_state = GaugeMetricFamily("p2pfl_peers", "Known peers by state", labels=["state"])
        for state, n in sorted(Counter(str(p.get("state")) for p in peers).items()):
            by_state.add_metric([state], float(n))
        yield by_state
        peer_bytes = CounterMetricFamily(
            "p2pfl_peer_bytes", "Bytes exchanged with each peer", labels=["peer", "direction"]
        )
        peer_msgs = CounterMetricFamily(
            "p2pfl_peer_messages_received", "Messages received from each peer", labels=["peer"]
        )
        peer_rejected = CounterMetricFamily(
            "p2pfl_peer_messages_rejected", "Messages from each peer rejected", labels=["peer"]
        )
        rtt = GaugeMetricFamily("p2pfl_peer_rtt_seconds", "Heartbeat round trip", labels=["peer"])
        for p in peers:
            pid = str(p.get("id"))
            for direction, key in (("in", "bytes_in"), ("out", "bytes_out")):
                if (v := _num(p.get(key))) is not None:
                    peer_bytes.add_metric([pid, direction], v)
            if (v := _num(p.get("messages_in"))) is not None:
                peer_msgs.add_metric([pid], v)
            if (v := _num(p.get("rejected"))) is not None:
                peer_rejected.add_metric([pid], v)
            if (v := _num(p.get("rtt_ms"))) is not None:
                rtt.add_metric([pid], v / 1000.0)
        yield from (peer_bytes, peer_msgs, peer_rejected, rtt)

        counters = s.get("counters") or {}
        total = CounterMetricFamily("p2pfl_bytes", "Bytes on the wire", labels=["direction"])
        for direction, key in (("sent", "bytes_sent"), ("received", "bytes_received")):
            if (v := _num(counters.get(key))) is not None:
                total.add_metric([direction], v)
        yield total
        yield from _labelled_counter(
            "p2pfl_frames_rejected", "Frames refused, by reason", "reason",
            counters.get("frames_rejected"),
        )  # fmt: skip
        yield from _labelled_counter(
            "p2pfl_contained_errors", "Failures contained without ending the node, by where",
            "where", counters.get("contained_errors"),
        )  # fmt: skip
        yield from _labelled_counter(
            "p2pfl_faults_injected", "Faults injected (scenario studies), by kind", "kind",
            counters.get("faults_injected"),
        )  # fmt: skip
        yield from _counter(
            "p2pfl_reconnects", "Reconnections to peers", counters.get("reconnects")
        )
        yield from _counter(
            "p2pfl_round_timeouts", "Rounds ended by their timeout", counters.get("timeouts")
        )
        yield from _labelled_counter(
            "p2pfl_handshake_failures", "Failed TLS/p2pfl handshakes, by who dialed", "direction",
            {"outbound": counters.get("handshake_failures", 0),
             "inbound": counters.get("inbound_handshake_failures", 0)},
        )  # fmt: skip
        yield from _counter(
            "p2pfl_dial_failures", "Dials that failed to connect", counters.get("dial_failures", 0)
        )

        self.durations.feed(s.get("history"))
        hist = HistogramMetricFamily("p2pfl_round_duration_seconds", "Wall time per round")
        hist.add_metric([], self.durations.cumulative(), sum_value=self.durations.sum)
        yield hist

        rob = s.get("robustness") or {}
        yield from _labelled_counter(
            "p2pfl_aggregation_fallbacks", "Aggregations that fell back, by reason", "reason",
            rob.get("fallbacks"),
        )  # fmt: skip
        yield from _labelled_counter(
            "p2pfl_aggregation_guards", "Aggregations a guard adjusted, by reason", "reason",
            rob.get("guards"),
        )  # fmt: skip
        suspicion = GaugeMetricFamily(
            "p2pfl_peer_suspicion", "Share of a peer's recent inputs flagged", labels=["peer"]
        )
        for peer, rec in (rob.get("suspicion") or {}).items():
            if isinstance(rec, Mapping) and (v := _num(rec.get("score"))) is not None:
                suspicion.add_metric([str(peer)], v)
        yield suspicion

        yield from self._model(s)
        yield from self._secure(s.get("secure"))
        yield from self._privacy(s.get("privacy"), s.get("privacy_examples"))
        memory = s.get("memory") or {}
        yield from _gauge(
            "p2pfl_python_blocks", "Python heap blocks allocated", memory.get("python_blocks")
        )

    def _model(self, s: Mapping[str, Any]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        history = s.get("history")
        last = row_metrics(history[-1]) if isinstance(history, list) and history else {}
        for name in ("loss", "accuracy"):
            yield from _gauge(
                f"p2pfl_model_{name}", f"The last round's test {name}", last.get(name)
            )
        family = GaugeMetricFamily(
            "p2pfl_model_metric", "The last round's test metrics", labels=["metric"]
        )
        for name, value in sorted(last.items()):
            family.add_metric([name], value)
        yield family
        model = s.get("model") or {}
        yield from _gauge("p2pfl_model_parameters", "Parameters in the model", model.get("params"))

    def _secure(self, secure: Any) -> Iterator[Any]:
        if not isinstance(secure, Mapping):
            return
        yield from _counter(
            "p2pfl_secure_rounds_grouped", "Rounds masked in a secure group",
            secure.get("rounds_grouped"),
        )  # fmt: skip
        yield from _labelled_counter(
            "p2pfl_secure_rounds_without_group", "Rounds without a secure group, by reason",
            "reason", secure.get("rounds_out"),
        )  # fmt: skip
        yield from _counter(
            "p2pfl_secure_means_forwarded", "Group means forwarded to outside neighbours",
            secure.get("means_forwarded"),
        )  # fmt: skip

    def _privacy(self, privacy: Any, examples: Any) -> Iterator[Any]:
        if isinstance(privacy, Mapping):
            yield from _gauge(
                "p2pfl_privacy_epsilon_spent", "Node-level epsilon spent", privacy.get("epsilon")
            )
            yield from _gauge(
                "p2pfl_privacy_epsilon_budget", "Node-level epsilon budget", privacy.get("budget")
            )
            yield from _gauge(
                "p2pfl_privacy_budget_exhausted", "1 once the budget is spent",
                privacy.get("exhausted"),
            )  # fmt: skip
        if isinstance(examples, Mapping):
            yield from _gauge(
                "p2pfl_privacy_example_epsilon", "Example-level (DP-SGD) epsilon",
                examples.get("epsilon"),
            )  # fmt: skip


def _gauge(name: str, doc: str, value: Any) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    if (v := _num(value)) is not None:
        yield GaugeMetricFamily(name, doc, value=v)


def _counter(name: str, doc: str, value: Any) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily

    if (v := _num(value)) is not None:
        yield CounterMetricFamily(name, doc, value=v)


def _labelled_counter(name: str, doc: str, label: str, values: Any) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=[label])
    if isinstance(values, Mapping):
        for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
            if (v := _num(value)) is not None:
                family.add_metric([str(key)], v)
    yield family


class Exporter:
    """The registry (this node's collector and the process collector) and its text."""

    def __init__(self, status: StatusFn) -> None:
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector
        except ImportError as exc:
            raise MetricsUnavailable(f"the metrics endpoint needs {EXTRA_HINT} ({exc})") from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(status))
        ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def response_for(request: bytes, exporter: Exporter) -> bytes:
    """The whole HTTP/1.0 response to one request head (sans-IO: tested without sockets)."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _http(400, b"bad request\n", "text/plain")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _http(405, b"only GET\n", "text/plain")
    if target == "/metrics":
        body, ctype = exporter.render()
        return _http(200, b"" if method == "HEAD" else body, ctype, length=len(body))
    if target == "/":
        return _http(200, b"p2pfl node metrics: /metrics\n", "text/plain")
    return _http(404, b"not found: try /metrics\n", "text/plain")


def _http(status: int, body: bytes, ctype: str, *, length: int | None = None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    head = (
        f"HTTP/1.0 {status} {reason.get(status, '')}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _handle(exporter: Exporter, stream: trio.abc.Stream) -> None:
    try:
        with trio.fail_after(IO_TIMEOUT):
            head = b""
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                if not chunk:
                    break
                head += chunk
                if len(head) > MAX_REQUEST_BYTES:
                    await stream.send_all(_http(400, b"request too large\n", "text/plain"))
                    return
            await stream.send_all(response_for(head, exporter))
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # one client's problem; the next scrape gets a fresh connection
    except Exception:  # a status field that broke the collector: log, keep serving
        log.exception("metrics: scrape failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    spec: str, status: StatusFn, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `spec` and answer scrapes until cancelled; `task_status` gets the port."""
    exporter = Exporter(status)
    host, port = metrics_address(spec)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "metrics endpoint on %s:%d is not loopback: anyone who reaches it reads this "
            "node's status (no authentication)",
            host,
            bound,
            extra=event("metrics.exposed", host=host, port=bound),
        )
    log.info(
        "metrics on http://%s:%d/metrics",
        host,
        bound,
        extra=event("metrics.listening", host=host, port=bound),
    )
    task_status.started(bound)
    await trio.serve_listeners(partial(_handle, exporter), listeners)
