"""Projections from the worker back to the front end, over a local ZMQ socket.

vLLM's `RequestOutput` has no free-form field for worker data, so the worker pushes what it
has (keyed by the request's `request_key`): for a summed request (the HTTP server's default),
its sums once, with the message that it left the engine; for one that asked for per-token
values (and offline), the projections of its response positions after every forward that
touched it. The front end pulls them into a `ProjectionSink`; when vLLM hands back the finished
output, `collect` waits until the request's projections are complete.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from personavec_vllm.results import LayerProjection, from_sums, summarize

logger = logging.getLogger(__name__)


@dataclass
class Message:
    """One message from a worker step, for one front-end process.

    - `values`: projections of monitored requests, `(request_key, first relative position,
      {(vector, layer): [values]})`;
    - `admitted`: keys of persona requests the worker took into its tables this step;
    - `failed`: `(request_key, engine request id, reason)` of persona requests the worker could
      not serve: they run unsteered until the front end aborts them, and must be answered with
      an error;
    - `gates`: `(request_key, [opened?])`: the decision of each of a request's conditions;
    - `sums`: `(request_key, {(vector, layer): (last prompt token, sum over generated tokens, how
      many)})` of summed requests, sent with their `done`;
    - `done`: keys of persona requests that left the engine (finished or aborted): nothing more
      will come for them.

    A projection series keyed `(vector, -layer)` holds the values before the request's own terms
    at `layer` (sent only where the request steers at that layer).
    """

    values: list[tuple[str, int, dict[tuple[str, int], list[float]]]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    gates: list[tuple[str, list[bool]]] = field(default_factory=list)
    sums: list[tuple[str, dict[tuple[str, int], tuple[float | None, float, int]]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.values or self.done or self.admitted or self.failed or self.gates or self.sums)


class PersonaRequestFailed(RuntimeError):
    """The worker could not serve a persona request (it was aborted); the message says why."""


class EngineGone(RuntimeError):
    """The engine died while a request waited for its projections."""


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

        def part(key: str) -> Message | None:
            address = self._routes.get(key)
            return None if address is None else parts.setdefault(address, Message())

        for item in message.values:
            if (out := part(item[0])) is not None:
                out.values.append(item)
        for key in message.admitted:
            if (out := part(key)) is not None:
                out.admitted.append(key)
        for failure in message.failed:
            if (out := part(failure[0])) is not None:
                out.failed.append(failure)
        for decision in message.gates:
            if (out := part(decision[0])) is not None:
                out.gates.append(decision)
        for summed in message.sums:
            if (out := part(summed[0])) is not None:
                out.sums.append(summed)
        for key in message.done:  # nothing more comes for these requests
            if (out := part(key)) is not None:
                out.done.append(key)
            self._routes.pop(key, None)
        for address, out in parts.items():
            publisher = self._publishers.get(address)
            if publisher is None:
                publisher = self._publishers[address] = ResultPublisher(address)
            publisher.send(out)


@dataclass
class _Pending:
    """What the sink knows about one persona request."""

    expected: list[tuple[str, int]] = field(default_factory=list)  # monitored (vector, layer) series
    values: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)
    sums: dict[tuple[str, int], tuple[float | None, float, int]] | None = None  # a summed request's
    held: bool = False  # someone will `discard` it; otherwise it goes when the request is done
    admitted: bool = False
    gates: list[bool] | None = None  # the decision of each of the request's conditions
    failure: str | None = None
    done: bool = False
    touched: float = field(default_factory=time.monotonic)
    waiters: list = field(default_factory=list)  # (event loop, future) of async waiters

    @property
    def reported(self) -> bool:
        """The worker said whether it serves the request (or the request is gone)."""
        return self.admitted or self.failure is not None or self.done


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


def _from_values(
    values: dict[tuple[str, int], dict[int, float]], vector: str, layer: int, num_generated: int | None
) -> LayerProjection:
    series = values.get((vector, layer), {})
    count = max(num_generated, 1) if num_generated is not None else len(series)
    got = [series[i] for i in range(count) if i in series]
    if len(got) != count or not got:
        raise RuntimeError(f"personavec: projections of {vector}@{layer} have gaps ({len(got)} of {count} positions)")
    prior = values.get((vector, -layer))
    before = [prior[i] for i in range(count) if i in prior] if prior else None
    return summarize(got, before if before and len(before) == count else None)


def _from_sums(
    sums: dict[tuple[str, int], tuple[float | None, float, int]], vector: str, layer: int
) -> LayerProjection:
    if (vector, layer) not in sums or sums[(vector, layer)][0] is None:
        raise RuntimeError(f"personavec: no projections of {vector}@{layer} (the prompt's last token never ran)")
    before = sums.get((vector, -layer))
    return from_sums(*sums[(vector, layer)], before=from_sums(*before) if before and before[0] is not None else None)


class ProjectionSink:
    """Front-end side: one background thread drains the socket into per-request records, which
    callers wait on: `await_admission` (did the worker take the request?), `acollect` / `collect`
    (its projections, once complete). `on_failure(key, engine_request_id, reason)` is called (on
    the sink thread) for every request the worker failed, so that the owner can abort it."""

    def __init__(self, address: str | None = None, ttl_s: float = 600.0):
        self.address = address or f"ipc://{tempfile.gettempdir()}/personavec-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        self.ttl_s = ttl_s
        self.on_failure: Callable[[str, str, str], None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.bind(self.address)
        self._thread = threading.Thread(target=self._run, name="personavec-sink", daemon=True)
        self._thread.start()

    def expect(self, key: str, expected: list[tuple[str, int]], held: bool = False) -> None:
        """Announce a persona request (before it reaches the engine), with the (vector, layer)
        series it monitors. A fresh record: whatever an earlier request with the same key left is
        dropped. `held`: the caller will `discard` the record when it is done with it."""
        with self._cond:
            self._pending[key] = _Pending(expected=list(expected), held=held)

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
                    failed = self._take(message, now)
                    if now - last_sweep > 60:  # records nobody came back for
                        for key in [k for k, p in self._pending.items() if now - p.touched > self.ttl_s]:
                            del self._pending[key]
                        last_sweep = now
                    self._cond.notify_all()
                for item in failed:
                    logger.error("personavec: request %s failed in the worker: %s", item[0], item[2])
                    if self.on_failure is not None:
                        self.on_failure(*item)
            except Exception:
                logger.exception("personavec: dropped a projection message")

    @staticmethod
    def _wake(pending: _Pending) -> None:
        for loop, future in pending.waiters:
            with contextlib.suppress(RuntimeError):  # the waiter's event loop has closed
                loop.call_soon_threadsafe(_resolve, future)
        pending.waiters.clear()

    def _take(self, message: Message, now: float) -> list[tuple[str, str, str]]:
        touched: dict[str, _Pending] = {}
        for key, start, series in message.values:
            pending = touched[key] = self._pending.setdefault(key, _Pending())
            for name, values in series.items():
                slots = pending.values.setdefault(name, {})
                for offset, value in enumerate(values):
                    slots[start + offset] = value
        for key, sums in message.sums:
            pending = touched[key] = self._pending.setdefault(key, _Pending())
            pending.sums = sums
        for key in message.admitted:
            pending = touched[key] = self._pending.setdefault(key, _Pending())
            pending.admitted = True
        for key, opened in message.gates:
            pending = touched[key] = self._pending.setdefault(key, _Pending())
            pending.gates = list(opened)
        failed = []
        for key, engine_id, reason in message.failed:
            pending = touched[key] = self._pending.setdefault(key, _Pending())
            if pending.failure is None:
                pending.failure = reason
                failed.append((key, engine_id, reason))
        for key in message.done:
            pending = touched[key] = self._pending.setdefault(key, _Pending())
            pending.done = True
        for key, pending in touched.items():
            pending.touched = now
            self._wake(pending)
            if pending.done and not pending.held and not pending.expected and pending.failure is None:
                del self._pending[key]  # steered only, served: nobody needs the record
        return failed

    # ---- waiting ----------------------------------------------------------------------
    async def _until(
        self, key: str, ready: Callable[[_Pending], bool], timeout: float, alive: Callable[[], bool] | None
    ) -> _Pending | None:
        """Wait until `ready(record)`; None if there is no record. Raises `TimeoutError`, or
        `EngineGone` as soon as `alive()` turns false (checked every 0.25 s)."""
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                pending = self._pending.get(key)
                if pending is None or ready(pending):
                    return pending
                future = loop.create_future()
                pending.waiters.append((loop, future))
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(key, pending, timeout)
            try:
                await asyncio.wait_for(future, min(left, 0.25))
            except asyncio.TimeoutError:
                if alive is not None and not alive():
                    raise EngineGone(f"personavec: the engine stopped before request {key} finished") from None

    async def await_admission(self, key: str, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
        """Return once the worker took the request into its tables; raise `PersonaRequestFailed`
        if it could not. Returns at once for requests the sink does not know."""
        pending = await self._until(key, lambda p: p.reported, timeout, alive)
        if pending is not None and pending.failure is not None:
            raise PersonaRequestFailed(pending.failure)

    async def gate_decisions(
        self, key: str, timeout: float = 30.0, alive: Callable[[], bool] | None = None
    ) -> list[bool] | None:
        """Whether each of the request's conditions opened (None: it has none, or it failed).
        Waits until the worker decided them (or the request is gone)."""
        pending = await self._until(
            key, lambda p: p.gates is not None or p.failure is not None or p.done, timeout, alive
        )
        return None if pending is None else pending.gates

    async def acollect(
        self,
        key: str,
        timeout: float = 30.0,
        alive: Callable[[], bool] | None = None,
    ) -> dict[str, dict[int, LayerProjection]]:
        """The request's projections, once the worker reported it gone: `{vector: {layer:
        LayerProjection}}`, empty when it monitored nothing. Takes the record."""
        try:
            pending = await self._until(key, lambda p: p.done or p.failure is not None, timeout, alive)
        finally:
            self.discard(key)
        if pending is None or not pending.expected:
            return {}
        if pending.failure is not None:
            raise PersonaRequestFailed(pending.failure)
        return self._summarize(pending, None)

    def collect(
        self, key: str, num_generated: int | None = None, timeout: float = 30.0
    ) -> dict[str, dict[int, LayerProjection]]:
        """Blocking `acollect` (offline API): complete means the worker reported the request gone,
        or, when `num_generated` is given, positions `0 .. num_generated-1` of every series
        arrived. Raises `PersonaRequestFailed` if the worker failed the request."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pending = self._pending.get(key)
                if pending is None:
                    return {}
                if pending.failure is not None:
                    del self._pending[key]
                    raise PersonaRequestFailed(pending.failure)
                if not pending.expected:
                    del self._pending[key]
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

    def failure(self, key: str, timeout: float = 30.0) -> str | None:
        """Offline API: why the worker failed request `key`, or None if it serves (or served) it.
        Waits until the worker reported on it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pending = self._pending.get(key)
                if pending is None or pending.failure is not None or pending.admitted or pending.done:
                    return None if pending is None else pending.failure
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timeout(key, pending, timeout)
                self._cond.wait(left)

    @staticmethod
    def _complete(pending: _Pending, num_generated: int | None) -> bool:
        if pending.done:
            return True
        if num_generated is None:
            return False
        needed = max(num_generated, 1)
        return all(all(i in pending.values.get(name, {}) for i in range(needed)) for name in pending.expected)

    @staticmethod
    def _summarize(pending: _Pending, num_generated: int | None) -> dict[str, dict[int, LayerProjection]]:
        out: dict[str, dict[int, LayerProjection]] = {}
        for vector, layer in pending.expected:
            if pending.sums is not None:
                projection = _from_sums(pending.sums, vector, layer)
            else:
                projection = _from_values(pending.values, vector, layer, num_generated)
            out.setdefault(vector, {})[layer] = projection
        return out

    @staticmethod
    def _timeout(key: str, pending: _Pending, timeout: float) -> TimeoutError:
        have = {f"{v}@{l}": len(x) for (v, l), x in pending.values.items()}
        return TimeoutError(
            f"personavec: no report on request {key} after {timeout:.0f}s "
            f"(positions received {have}, admitted={pending.admitted}, finished={pending.done})"
        )

    def discard(self, key: str) -> None:
        with self._cond:
            self._pending.pop(key, None)
