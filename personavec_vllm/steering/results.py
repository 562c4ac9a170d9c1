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

import contextlib
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

# extra_args key: the sink address of the front-end process that took a monitored request.
REPLY_TO_KEY = "personavec_reply_to"

# One message from a worker step: projections of monitored requests,
# [(request_key, first relative position, {(vector, layer): [values]})], and the keys of
# monitored requests that left the engine (finished or aborted): nothing more will come.
@dataclass
class Message:
    values: list[tuple[str, int, dict[tuple[str, int], list[float]]]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


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


class ResultRouter:
    """Worker side (tensor-parallel rank 0): sends each request's projections to the sink of the
    front-end process that took the request.

    With several API server processes (`--api-server-count N`) each binds its own sink, so every
    monitored request names its front end's sink (`extra_args[REPLY_TO_KEY]`, set in
    `frontend.process_inputs`). A request that names none has nobody waiting: nothing is sent."""

    def __init__(self):
        self._routes: dict[str, str] = {}  # request_key -> sink address
        self._publishers: dict[str, ResultPublisher] = {}

    def route(self, key: str, address: str | None) -> None:
        if address:
            self._routes[key] = address

    def send(self, message: Message) -> None:
        parts: dict[str, Message] = {}
        for item in message.values:
            address = self._routes.get(item[0])
            if address:
                parts.setdefault(address, Message()).values.append(item)
        for key in message.done:  # nothing more comes for these requests
            address = self._routes.pop(key, None)
            if address:
                parts.setdefault(address, Message()).done.append(key)
        for address, part in parts.items():
            publisher = self._publishers.get(address)
            if publisher is None:
                publisher = self._publishers[address] = ResultPublisher(address)
            publisher.send(part)


@dataclass
class _Pending:
    expected: list[tuple[str, int]] = field(default_factory=list)
    values: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)
    done: bool = False
    touched: float = field(default_factory=time.monotonic)
    waiters: list = field(default_factory=list)  # (event loop, future) of async collectors


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


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
        """Announce a monitored request (before it reaches the engine). A fresh entry: whatever
        an earlier request with the same key left behind is dropped."""
        with self._cond:
            self._pending[key] = _Pending(expected=list(expected))

    def _run(self) -> None:
        """Drain the socket forever: a bad message is logged and dropped, never fatal, because
        every later request's projections depend on this thread."""
        last_sweep = time.monotonic()
        while True:
            try:
                if not self._socket.poll(1000):
                    continue
                message: Message = pickle.loads(self._socket.recv())
                now = time.monotonic()
                with self._cond:
                    self._take(message, now)
                    if now - last_sweep > 60:  # results nobody asked for (aborted requests)
                        for key in [k for k, p in self._pending.items() if now - p.touched > self.ttl_s]:
                            del self._pending[key]
                        last_sweep = now
                    self._cond.notify_all()
            except Exception:  # noqa: BLE001 - keep the sink alive
                logger.exception("personavec: dropped a projection message")

    def _take(self, message: Message, now: float) -> None:
        for key, start, series in message.values:
            pending = self._pending.setdefault(key, _Pending())
            pending.touched = now
            for name, values in series.items():
                slots = pending.values.setdefault(name, {})
                for offset, value in enumerate(values):
                    slots[start + offset] = value
        for key in message.done:
            pending = self._pending.setdefault(key, _Pending())
            pending.done, pending.touched = True, now
            for loop, future in pending.waiters:
                with contextlib.suppress(RuntimeError):  # the waiter's event loop has closed
                    loop.call_soon_threadsafe(_resolve, future)
            pending.waiters.clear()

    def collect(self, key: str, num_generated: int | None = None, timeout: float = 30.0) -> dict[str, dict[int, LayerProjection]]:
        """Wait until the request's projections are complete and take them:
        `{vector: {layer: LayerProjection}}`, empty when the request monitored nothing.

        Complete means the worker reported the request gone (finished or aborted), or, when
        `num_generated` is given, positions `0 .. num_generated-1` of every series arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pending = self._pending.get(key)
                if pending is None or not pending.expected:
                    self._pending.pop(key, None)
                    return {}
                if self._complete(pending, num_generated):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._pending.pop(key, None)
                    raise self._timeout(key, pending, timeout)
                self._cond.wait(left)
            del self._pending[key]
        return self._summarize(pending, num_generated)

    async def acollect(self, key: str, timeout: float = 30.0) -> dict[str, dict[int, LayerProjection]]:
        """`collect` for asyncio callers (waits for the worker's end-of-request report)."""
        import asyncio

        loop = asyncio.get_running_loop()
        with self._cond:
            pending = self._pending.get(key)
            if pending is None or not pending.expected:
                self._pending.pop(key, None)
                return {}
            future = loop.create_future()
            if pending.done:
                future.set_result(None)
            else:
                pending.waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            with self._cond:
                self._pending.pop(key, None)
            raise self._timeout(key, pending, timeout) from None
        with self._cond:
            self._pending.pop(key, None)
        return self._summarize(pending, None)

    @staticmethod
    def _complete(pending: _Pending, num_generated: int | None) -> bool:
        if pending.done:
            return True
        if num_generated is None:
            return False
        needed = max(num_generated, 1)
        return all(
            all(i in pending.values.get(name, {}) for i in range(needed)) for name in pending.expected
        )

    @staticmethod
    def _summarize(pending: _Pending, num_generated: int | None) -> dict[str, dict[int, LayerProjection]]:
        out: dict[str, dict[int, LayerProjection]] = {}
        for vector, layer in pending.expected:
            series = pending.values.get((vector, layer), {})
            count = max(num_generated, 1) if num_generated is not None else len(series)
            values = [series[i] for i in range(count) if i in series]
            if len(values) != count or not values:
                raise RuntimeError(
                    f"personavec: projections of {vector}@{layer} have gaps "
                    f"({len(values)} of {count} positions)"
                )
            out.setdefault(vector, {})[layer] = summarize(values)
        return out

    @staticmethod
    def _timeout(key: str, pending: _Pending, timeout: float) -> TimeoutError:
        have = {f"{v}@{l}": len(x) for (v, l), x in pending.values.items()}
        return TimeoutError(
            f"personavec: projections of request {key} incomplete after {timeout:.0f}s "
            f"(positions received {have}, finished={pending.done})"
        )

    def discard(self, key: str) -> None:
        with self._cond:
            self._pending.pop(key, None)
