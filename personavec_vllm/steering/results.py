"""Projections from the worker back to the front end, over a local ZMQ socket.

vLLM's `RequestOutput` has no free-form field for worker data, so the worker pushes, after
every forward that touched a monitored request, the projections of that request's response
positions (keyed by the request's `request_key`). The front end pulls them into a
`ProjectionSink`; when vLLM hands back the finished output, `collect` waits until every
position the request generated is there.

Relative positions: 0 is the last prompt token, `i` is the hidden state from which output
token `i` was sampled. The final output token is never fed back, so a request that generated
`n` tokens has positions `0 .. n-1`.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

logger = logging.getLogger(__name__)

ADDRESS_ENV = "PERSONAVEC_RESULTS_ADDR"

# One message: [(request_key, first relative position, {(vector, layer): [values]})]
Message = list[tuple[str, int, dict[tuple[str, int], list[float]]]]


@dataclass
class LayerProjection:
    """Projections of one request on one vector at one layer."""

    prompt_last: float
    response_mean: float | None
    per_token: list[float]

    def to_dict(self, per_token: bool) -> dict:
        out = {"prompt_last": self.prompt_last, "response_mean": self.response_mean}
        if per_token:
            out["per_token"] = self.per_token
        return out


def summarize(values: list[float]) -> LayerProjection:
    """`values[0]` is the last prompt token; the rest are the generated tokens fed back."""
    response = values[1:]
    mean = sum(response) / len(response) if response else None
    return LayerProjection(values[0], mean, list(values))


class ResultPublisher:
    """Worker side: pushes messages; connects lazily to the address the front end bound."""

    def __init__(self, address: str):
        self.address = address
        self._socket: zmq.Socket | None = None

    def send(self, message: Message) -> None:
        if self._socket is None:
            self._socket = zmq.Context.instance().socket(zmq.PUSH)
            self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop: the sink always drains
            self._socket.setsockopt(zmq.LINGER, 5000)
            self._socket.connect(self.address)
        self._socket.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), copy=False)


@dataclass
class _Pending:
    expected: list[tuple[str, int]] = field(default_factory=list)
    values: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)


class ProjectionSink:
    """Front-end side: one background thread drains the socket into per-request buffers."""

    def __init__(self, address: str | None = None, ttl_s: float = 600.0):
        self.address = address or f"ipc://{tempfile.gettempdir()}/personavec-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        self.ttl_s = ttl_s
        self._pending: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.bind(self.address)
        self._thread = threading.Thread(target=self._run, name="personavec-sink", daemon=True)
        self._thread.start()

    def expect(self, key: str, expected: list[tuple[str, int]]) -> None:
        """Announce a monitored request (before it reaches the engine)."""
        with self._cond:
            self._pending.setdefault(key, _Pending()).expected = list(expected)

    def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            if not self._socket.poll(1000):
                continue
            message: Message = pickle.loads(self._socket.recv())
            now = time.monotonic()
            with self._cond:
                for key, start, series in message:
                    pending = self._pending.setdefault(key, _Pending())
                    pending.touched = now
                    for name, values in series.items():
                        slots = pending.values.setdefault(name, {})
                        for offset, value in enumerate(values):
                            slots[start + offset] = value
                if now - last_sweep > 60:  # results nobody asked for (aborted requests)
                    for key in [k for k, p in self._pending.items() if now - p.touched > self.ttl_s]:
                        del self._pending[key]
                    last_sweep = now
                self._cond.notify_all()

    def collect(self, key: str, num_generated: int, timeout: float = 30.0) -> dict[str, dict[int, LayerProjection]]:
        """Wait for positions `0 .. num_generated-1` of every expected (vector, layer), take them,
        and return `{vector: {layer: LayerProjection}}` (empty when the request monitored nothing)."""
        needed = max(num_generated, 1)
        deadline = time.monotonic() + timeout

        def missing(pending: _Pending) -> list[tuple[str, int]]:
            return [
                name for name in pending.expected
                if any(i not in pending.values.get(name, {}) for i in range(needed))
            ]

        with self._cond:
            pending = self._pending.get(key)
            if pending is None or not pending.expected:
                self._pending.pop(key, None)
                return {}
            while missing(pending):
                left = deadline - time.monotonic()
                if left <= 0:
                    have = {f"{v}@{l}": len(x) for (v, l), x in pending.values.items()}
                    self._pending.pop(key, None)
                    raise TimeoutError(
                        f"personavec: projections of request {key} incomplete after {timeout:.0f}s "
                        f"(positions received {have}, need {needed})"
                    )
                self._cond.wait(left)
            del self._pending[key]
        out: dict[str, dict[int, LayerProjection]] = {}
        for vector, layer in pending.expected:
            series = pending.values[(vector, layer)]
            out.setdefault(vector, {})[layer] = summarize([series[i] for i in range(needed)])
        return out

    def discard(self, key: str) -> None:
        with self._cond:
            self._pending.pop(key, None)
