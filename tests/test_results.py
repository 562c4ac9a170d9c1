"""The projection side channel: a real ZMQ socket between a publisher and the sink."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from personavec_vllm.engine.transport import Message, ProjectionSink, ResultPublisher, summarize


def test_summary_convention():
    s = summarize([1.0, 2.0, 4.0])
    assert (s.prompt_last, s.response_mean, s.per_token) == (1.0, 3.0, [1.0, 2.0, 4.0])
    assert summarize([5.0]).response_mean is None  # one generated token: nothing fed back


def test_sink_assembles_chunks_and_overwrites_recomputed_positions():
    sink = ProjectionSink()
    pub = ResultPublisher(sink.address)
    sink.expect("r1", [("evil", 3)])
    pub.send(Message(values=[("r1", 0, {("evil", 3): [1.0, 2.0]})]))
    pub.send(Message(values=[("r1", 1, {("evil", 3): [2.0, 3.0]})]))  # recompute after preemption
    out = sink.collect("r1", num_generated=3, timeout=5)
    assert out["evil"][3].per_token == [1.0, 2.0, 3.0]
    assert sink.collect("unknown", num_generated=1) == {}


def test_sink_done_marker_and_async_collect():
    sink = ProjectionSink()
    pub = ResultPublisher(sink.address)
    sink.expect("r2", [("a", 1), ("b", 2)])

    async def main():
        task = asyncio.create_task(sink.acollect("r2", timeout=5))
        await asyncio.sleep(0.05)
        pub.send(Message(values=[("r2", 0, {("a", 1): [0.5, 1.5], ("b", 2): [-1.0, -2.0]})]))
        pub.send(Message(done=["r2"]))
        return await task

    out = asyncio.run(main())
    assert out["a"][1].response_mean == 1.5 and out["b"][2].prompt_last == -1.0


def test_sink_times_out_clearly():
    sink = ProjectionSink()
    sink.expect("r3", [("a", 1)])
    with pytest.raises(TimeoutError, match="r3"):
        sink.collect("r3", num_generated=2, timeout=0.2)


def test_a_new_request_with_a_reused_key_starts_fresh():
    sink = ProjectionSink()
    pub = ResultPublisher(sink.address)
    sink.expect("k", [("a", 1)])
    pub.send(Message(values=[("k", 0, {("a", 1): [9.0, 9.0, 9.0]})], done=["k"]))
    assert sink.collect("k", timeout=5)["a"][1].per_token == [9.0, 9.0, 9.0]
    sink.expect("k", [("a", 1)])
    pub.send(Message(values=[("k", 0, {("a", 1): [1.0]})], done=["k"]))
    assert sink.collect("k", timeout=5)["a"][1].per_token == [1.0]


def test_a_child_process_never_takes_over_the_parents_sink():
    """A server or engine started from this process binds its own sink; when it exits, this
    process's sink still receives (it once inherited the address and unlinked our socket file)."""
    from personavec_vllm.engine.frontend import projection_sink

    sink = projection_sink()
    child = "from personavec_vllm.engine.frontend import projection_sink; print(projection_sink().address)"
    out = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() != sink.address
    sink.expect("after-child", [("a", 1)])
    ResultPublisher(sink.address).send(Message(values=[("after-child", 0, {("a", 1): [4.0]})], done=["after-child"]))
    assert sink.collect("after-child", timeout=10)["a"][1].prompt_last == 4.0
