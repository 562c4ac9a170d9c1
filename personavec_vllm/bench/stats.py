"""Statistics of one benchmark run: per-level summaries, ratios over the baseline with their
spread over passes, and the issue's targets.

Pure functions of the per-request timings the runner measured, so they are unit-tested
without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from personavec_vllm.bench.scenarios import BASELINE, SCENARIOS


@dataclass
class RequestResult:
    """One request's timing, in seconds from the start of its level (its scenario and
    concurrency). `first_token` is when the first output token arrived (streaming)."""

    scenario: str
    concurrency: int
    index: int
    prompt_len: int
    output_len: int  # asked for
    output_tokens: int  # received
    submit: float
    first_token: float  # NaN when not streaming
    end: float
    error: str = ""
    pass_index: int = 0  # which pass of the interleaved measurement (HF: -1, measured once)

    @property
    def latency(self) -> float:
        return self.end - self.submit

    @property
    def ttft(self) -> float:
        return self.first_token - self.submit


@dataclass
class LevelStats:
    scenario: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tok_per_s: float
    latency_p50: float
    latency_p99: float
    ttft_p50: float
    ttft_p99: float
    errors: int
    # CPU that processes other than the benchmark and its server used meanwhile (cores, steal
    # included): other tenants of a shared machine, the reason to distrust a level
    other_cpu: float = math.nan
    pass_index: int = 0
    # CPU seconds the server's processes used over the level (/proc; NaN for the HF reference):
    # unlike wall time, not stretched by waiting for a core (other tenants, steal)
    server_cpu_s: float = math.nan
    worker_cpu_s: float = math.nan
    instance: int = 0  # which start of the servers measured it (--instances)
    worker_minor_faults: float = math.nan  # pages the worker got fresh from the kernel over the level
    worker_huge_mb: float = math.nan  # the worker's memory on transparent huge pages at the level's end
    # vLLM's counters over the level: prompt tokens computed (prefix-cache hits excluded), preemptions
    prompt_tokens_computed: float = math.nan
    preemptions: float = math.nan
    engine_steps: float = math.nan

    @property
    def tok_per_worker_cpu_s(self) -> float:
        """Output tokens per CPU second of the engine's worker (where the model runs)."""
        return self.output_tokens / self.worker_cpu_s if self.worker_cpu_s > 0 else math.nan

    @property
    def tok_per_server_cpu_s(self) -> float:
        """Output tokens per CPU second of all the server's processes."""
        return self.output_tokens / self.server_cpu_s if self.server_cpu_s > 0 else math.nan


def levels_of(stats: Sequence[LevelStats]) -> list[int]:
    """The concurrencies measured, ascending."""
    return sorted({s.concurrency for s in stats})


def scenarios_of(stats: Sequence[LevelStats]) -> list[str]:
    """The scenarios measured, in the benchmark's order."""
    present = {s.scenario for s in stats}
    return [s.key for s in SCENARIOS if s.key in present]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method). NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(results: Sequence[RequestResult]) -> LevelStats:
    """Stats of one level: throughput is output tokens over the level's wall time (first
    submission to last completion)."""
    if not results:
        raise ValueError("no results")
    keys = {(r.scenario, r.concurrency, r.pass_index) for r in results}
    if len(keys) != 1:
        raise ValueError(f"results of several levels: {sorted(keys)}")
    scenario, concurrency, pass_index = keys.pop()
    ok = [r for r in results if not r.error]
    ttfts = [r.ttft for r in ok if not math.isnan(r.ttft)]
    wall = max(r.end for r in results) - min(r.submit for r in results)
    tokens = sum(r.output_tokens for r in ok)
    return LevelStats(
        scenario=scenario,
        concurrency=concurrency,
        requests=len(results),
        output_tokens=tokens,
        wall_s=wall,
        tok_per_s=tokens / wall if wall > 0 else math.nan,
        latency_p50=percentile([r.latency for r in ok], 50),
        latency_p99=percentile([r.latency for r in ok], 99),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        errors=len(results) - len(ok),
        pass_index=pass_index,
    )


def summarize_all(results: Iterable[RequestResult]) -> list[LevelStats]:
    """One `LevelStats` per scenario, concurrency and pass."""
    groups: dict[tuple[str, int, int], list[RequestResult]] = {}
    for r in results:
        groups.setdefault((r.scenario, r.concurrency, r.pass_index), []).append(r)
    order = {s.key: i for i, s in enumerate(SCENARIOS)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[1], k[2]))
    return [summarize(groups[k]) for k in keys]


def closed_loop_times(measured: Sequence[tuple[float, float]], concurrency: int) -> list[tuple[float, float, float]]:
    """Submission times for requests served in order by a closed loop of `concurrency` clients.

    `measured[j] = (first_token, end)` of request j, absolute seconds from the start of a run
    that executed the requests back to back (in batches or one by one). Client
    `j % concurrency` sends request j when its previous request (j - concurrency) ends, at 0
    for the first `concurrency`. Returns `(submit, first_token, end)` per request: what
    `concurrency` clients would see, waiting in the queue included."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    out: list[tuple[float, float, float]] = []
    for j, (first, end) in enumerate(measured):
        submit = out[j - concurrency][2] if j >= concurrency else 0.0
        out.append((submit, first, end))
    return out


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def share_interval(hits: int, draws: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion, `hits` of `draws`. A profile's share of samples
    in our code sits near 0, where the normal approximation's interval dips below 0; Wilson's
    does not. Samples count as independent draws (py-spy's ticks are 20 ms apart)."""
    if draws <= 0:
        return (math.nan, math.nan)
    p, zz = hits / draws, z * z / draws
    centre = (p + zz / 2) / (1 + zz)
    half = z * math.sqrt(p * (1 - p) / draws + zz / (4 * draws)) / (1 + zz)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Ratio:
    """A scenario's output tok/s over the baseline's at one concurrency: the median over passes
    of each pass's ratio (both measured in that pass, side by side), and the lowest and highest
    pass. For the baseline itself: each pass's tok/s over the baseline's median (the noise floor)."""

    median: float
    low: float
    high: float
    passes: int


def rates_by_pass(stats: Sequence[LevelStats], key: str, metric: str = "tok_per_s") -> dict[int, dict[int, float]]:
    """{concurrency: {pass: value}} of scenario `key`; `metric`: a `LevelStats` attribute where
    higher is better (output tok/s, or output tokens per CPU second)."""
    out: dict[int, dict[int, float]] = {}
    for s in stats:
        value = getattr(s, metric)
        if s.scenario == key and not math.isnan(value):
            out.setdefault(s.concurrency, {})[s.pass_index] = value
    return out


def baseline_rates(stats: Sequence[LevelStats], baseline: str = BASELINE) -> dict[int, float]:
    """Per concurrency, the median over passes of the baseline's output tok/s."""
    return {c: median(list(by_pass.values())) for c, by_pass in rates_by_pass(stats, baseline).items()}


def ratio_spread(
    stats: Sequence[LevelStats], baseline: str = BASELINE, metric: str = "tok_per_s"
) -> dict[tuple[str, int], Ratio]:
    """`Ratio` of every (scenario, concurrency). A pass the baseline did not run in (the HF
    reference, measured once) divides by the baseline's median."""
    base = rates_by_pass(stats, baseline, metric)
    out = {}
    for key in {s.scenario for s in stats}:
        for c, by_pass in rates_by_pass(stats, key, metric).items():
            if c not in base:
                continue
            mid = median(list(base[c].values()))
            if key == baseline:
                values = [v / mid for v in by_pass.values()]
            else:
                values = [v / base[c].get(p, mid) for p, v in by_pass.items()]
            if values and mid > 0:
                out[(key, c)] = Ratio(median(values), min(values), max(values), len(values))
    return out


def ratios(stats: Sequence[LevelStats], baseline: str = BASELINE) -> dict[tuple[str, int], float]:
    """The median ratio of each (scenario, concurrency) (see `Ratio`)."""
    return {k: r.median for k, r in ratio_spread(stats, baseline).items()}


def speedup(stats: Sequence[LevelStats], num: str, den: str) -> dict[int, float]:
    """Median tok/s of scenario `num` over that of scenario `den`, per concurrency."""
    a, b = baseline_rates(stats, num), baseline_rates(stats, den)
    return {c: a[c] / b[c] for c in sorted(a) if c in b and b[c] > 0}


@dataclass(frozen=True)
class Target:
    text: str
    scenarios: tuple[str, ...]
    minimum: float
    over: str = BASELINE  # ratio over this scenario (BASELINE: over the baseline, see `ratios`)
    concurrency: int | None = None  # None: every level


TARGETS = (
    Target("2 >= 0.99 x plain vLLM", ("unsteered",), 0.99),
    Target("3, 4 >= 0.98 x plain vLLM", ("steer_same", "steer_distinct"), 0.98),
    Target("5a, 5b, 5d >= 0.97 x plain vLLM", ("monitor1", "monitor3", "policy_monitor3"), 0.97),
    Target(
        "5c >= 0.97 x 2 (plugin, unsteered) at concurrency 32",
        ("ops",),
        0.97,
        over="unsteered",
        concurrency=32,
    ),
    Target(
        "4 >= 8 x 6b (HF, distinct specs) at concurrency 32",
        ("steer_distinct",),
        8.0,
        over="hf_distinct",
        concurrency=32,
    ),
)


def evaluate_targets(stats: Sequence[LevelStats]) -> list[dict]:
    """One row per target and scenario: the measured ratio at each level, and whether all met."""
    rows = []
    for t in TARGETS:
        for key in t.scenarios:
            if t.over == BASELINE:
                measured = {c: v for (k, c), v in sorted(ratios(stats).items()) if k == key}
            else:
                measured = speedup(stats, key, t.over)
            if t.concurrency is not None:
                measured = {c: v for c, v in measured.items() if c == t.concurrency}
            rows.append(
                {
                    "target": t.text,
                    "scenario": key,
                    "over": t.over,
                    "minimum": t.minimum,
                    "measured": measured,
                    "met": bool(measured) and all(v >= t.minimum for v in measured.values()),
                    "evaluated": bool(measured),
                }
            )
    return rows
