"""Async HTTP load: a closed loop of `concurrency` clients on `/v1/chat/completions` (text
prompts) or `/v1/completions` (token-id prompts), streaming or not.

Each client sends its next request as soon as its previous one finished. Streaming: time to
first token is when the first chunk with a choice arrives; output tokens are counted from the
`usage` chunk (`stream_options.include_usage`); the `persona` object arrives in its own last
chunk on a personavec server. Not streaming: there is no time to first token (NaN); tokens and
`persona` come in the one response.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from personavec_vllm.bench.stats import RequestResult
from personavec_vllm.bench.workload import BenchRequest

# checks a request's `persona` object (None if absent); returns a problem or None
PersonaCheck = Callable[[dict[str, Any] | None, int], str | None]


API_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def completion_body(
    model: str, req: BenchRequest, *, stream: bool = True, extra: dict | None = None, api: str = "completions"
) -> dict:
    body: dict[str, Any] = {"model": model}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": req.text}]
    else:
        body["prompt"] = list(req.prompt_token_ids)
    body |= {
        "max_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return body


async def _one(session, url: str, body: dict, t0: float) -> dict[str, Any]:
    if not body.get("stream"):
        return await _one_response(session, url, body, t0)
    submit = time.perf_counter() - t0
    first = None
    usage = None
    persona = None
    chunks = 0
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            text = (await resp.text())[:300]
            end = time.perf_counter() - t0
            return dict(submit=submit, first=end, end=end, tokens=0, persona=None, error=f"HTTP {resp.status}: {text}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if obj.get("choices"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
            if "persona" in obj:
                persona = obj["persona"]
            if "error" in obj:
                end = time.perf_counter() - t0
                return dict(
                    submit=submit,
                    first=first or end,
                    end=end,
                    tokens=0,
                    persona=persona,
                    error=f"stream error: {str(obj['error'])[:300]}",
                )
    end = time.perf_counter() - t0
    return dict(
        submit=submit,
        first=first if first is not None else end,
        end=end,
        tokens=usage if usage is not None else chunks,
        persona=persona,
        error="",
    )


async def _one_response(session, url: str, body: dict, t0: float) -> dict[str, Any]:
    submit = time.perf_counter() - t0
    async with session.post(url, json=body) as resp:
        text = await resp.text()
    end = time.perf_counter() - t0
    out: dict[str, Any] = dict(submit=submit, first=math.nan, end=end, tokens=0, persona=None, error="")
    if resp.status != 200:
        return out | {"error": f"HTTP {resp.status}: {text[:300]}"}
    obj = json.loads(text)
    return out | {"tokens": (obj.get("usage") or {}).get("completion_tokens", 0), "persona": obj.get("persona")}


async def run_level_async(
    base_url: str,
    model: str,
    scenario: str,
    concurrency: int,
    requests: Sequence[BenchRequest],
    extra_of: Callable[[int], dict],
    check: PersonaCheck,
    progress: Callable[[int], None] | None = None,
    *,
    api: str = "completions",
    stream: bool = True,
    pass_index: int = 0,
) -> list[RequestResult]:
    import aiohttp

    url = base_url.rstrip("/") + API_PATHS[api]
    queue = list(range(len(requests)))
    queue.reverse()
    results: list[RequestResult | None] = [None] * len(requests)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def client() -> None:
            while queue:
                j = queue.pop()
                req = requests[j]
                body = completion_body(model, req, stream=stream, extra=extra_of(req.index), api=api)
                try:
                    r = await _one(session, url, body, t0)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    now = time.perf_counter() - t0
                    r = dict(
                        submit=now, first=now, end=now, tokens=0, persona=None, error=f"{type(exc).__name__}: {exc}"
                    )
                error = r["error"]
                if not error and r["tokens"] != req.output_len:
                    error = f"got {r['tokens']} output tokens, asked for {req.output_len}"
                if not error:
                    error = check(r["persona"], req.index) or ""
                results[j] = RequestResult(
                    scenario=scenario,
                    concurrency=concurrency,
                    index=req.index,
                    prompt_len=req.prompt_len,
                    output_len=req.output_len,
                    output_tokens=r["tokens"],
                    submit=r["submit"],
                    first_token=r["first"],
                    end=r["end"],
                    error=error,
                    pass_index=pass_index,
                )
                if progress:
                    progress(1)

        await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
    return [r for r in results if r is not None]


def run_level(*args, **kwargs) -> list[RequestResult]:
    return asyncio.run(run_level_async(*args, **kwargs))
