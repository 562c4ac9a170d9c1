"""The serving benchmark (personavec_vllm.bench): workload generator, statistics and report (fast), and a
smoke run of the whole benchmark on a tiny model (slow)."""

from __future__ import annotations

import csv
import math
import os
import random
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from personavec_vllm.bench import report as rep
from personavec_vllm.bench import stats as st
from personavec_vllm.bench.scenarios import SCENARIOS, BenchVectors, label, persona_fields, steer_distinct
from personavec_vllm.bench.workload import LengthRange, WorkloadConfig, make_workload, word_vocab

VOCAB = list(range(1000, 1500))


# ---- workload --------------------------------------------------------------------------------


def test_length_range_parse():
    assert LengthRange.parse("64") == LengthRange(64, 64)
    assert LengthRange.parse("32:96") == LengthRange(32, 96)
    assert str(LengthRange(32, 96)) == "32:96" and str(LengthRange(8, 8)) == "8"
    for bad in ("", "a", "1:2:3", "0", "9:3", "-1:4"):
        with pytest.raises(ValueError):
            LengthRange.parse(bad)


def test_workload_is_seeded_and_reproducible():
    cfg = WorkloadConfig(seed=3)
    a = make_workload(cfg, 50, VOCAB)
    assert a == make_workload(cfg, 50, VOCAB)
    assert make_workload(cfg, 10, VOCAB) == a[:10]  # a level with fewer requests sends a prefix
    assert make_workload(WorkloadConfig(seed=4), 50, VOCAB) != a
    assert [r.index for r in a] == list(range(50))


def test_every_measurement_has_words_of_its_own():
    """Each level of a pass sends other prompts than the level before it on the same server: the
    c=64 measurement used to resend c=32's prompts and, with prefix caching on, a server whose
    cache still held them ran 1.6x faster than the others for less work."""
    from types import SimpleNamespace

    from personavec_vllm import cli
    from personavec_vllm.bench.run import Bench

    bench = Bench(cli.build_parser().parse_args(["bench", "--concurrency", "32,64"]), "test")
    bench.workload = make_workload(WorkloadConfig(seed=0), 8, VOCAB)
    bench.vocab = VOCAB
    bench.tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    prompts = {
        (p, s, c): [r.text for r in bench.words_for(p, s, c)] for p in (-1, 0, 1) for s in (-1, 0, 2) for c in (32, 64)
    }
    firsts = [texts[0] for texts in prompts.values()]
    assert len(set(firsts)) == len(firsts)  # no two measurements share a prompt
    assert prompts[(0, 2, 64)] == [r.text for r in bench.words_for(0, 2, 64)]  # seeded
    shapes = [len(r.prompt_token_ids) for r in bench.words_for(1, 0, 64)]
    assert shapes == [r.prompt_len for r in bench.workload]  # the same lengths everywhere


def test_workload_distributions_within_bounds():
    cfg = WorkloadConfig(seed=0, prompt_len=LengthRange(32, 512), prompt_sigma=0.6, output_len=LengthRange(32, 96))
    reqs = make_workload(cfg, 2000, VOCAB)
    prompts = [r.prompt_len for r in reqs]
    outputs = [r.output_len for r in reqs]
    assert min(prompts) >= 32 and max(prompts) <= 512
    assert min(outputs) >= 32 and max(outputs) <= 96
    assert all(t in set(VOCAB) for r in reqs[:50] for t in r.prompt_token_ids)
    # log-normal prompt lengths: median near sqrt(32 * 512) = 128, both clips reached, right skew
    assert 110 <= statistics.median(prompts) <= 146
    assert statistics.mean(prompts) > statistics.median(prompts)
    assert 32 in prompts and 512 in prompts
    # uniform output lengths: every value, mean near the middle
    assert set(outputs) == set(range(32, 97))
    assert abs(statistics.mean(outputs) - 64) < 2


def test_workload_fixed_lengths():
    reqs = make_workload(WorkloadConfig(prompt_len=LengthRange(20, 20), output_len=LengthRange(64, 64)), 30, VOCAB)
    assert {r.prompt_len for r in reqs} == {20} and {r.output_len for r in reqs} == {64}
    with pytest.raises(ValueError):
        make_workload(WorkloadConfig(), 3, [])


def test_word_vocab_keeps_plain_words():
    class Tok:
        all_special_ids = (0,)

        def get_vocab(self):
            return {"<|im_start|>": 0, "Ġthe": 5, "Ġa": 6, "Ġ123": 7, "ĠcafÃ©": 8, "word": 9, "Ġhouse": 10, "Ġx": 11}

    assert word_vocab(Tok()) == [5, 10]
    assert word_vocab(Tok(), limit=1) == [5]


# ---- scenarios -------------------------------------------------------------------------------

VECTORS = BenchVectors("/nowhere", tuple(f"v{i}" for i in range(8)), (9, 10, 12, 13, 15, 16, 18, 21), 30)


def test_distinct_specs_are_distinct_and_valid():
    specs = [steer_distinct(i, VECTORS) for i in range(256)]
    keys = {repr(s) for s in specs}
    assert len(keys) == 256
    for s in specs:
        for term in s:
            assert 0 < abs(term["coeff"]) <= 50
            assert all(1 <= layer <= 30 for layer in term["layers"])
            assert term["vector"] in VECTORS.names
    assert {len(s) for s in specs} == {1, 2}


def test_persona_fields_per_scenario():
    assert persona_fields("plain", 0, VECTORS) == {} == persona_fields("unsteered", 5, VECTORS)
    same = {repr(persona_fields("steer_same", i, VECTORS)) for i in range(10)}
    assert len(same) == 1
    assert persona_fields("monitor3", 0, VECTORS) == {"persona_monitor": {"vectors": ["v0", "v1", "v2"]}}
    assert persona_fields("monitor1", 0, VECTORS) == {"persona_monitor": {"vectors": ["v0"]}}


# ---- statistics ------------------------------------------------------------------------------


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101):
        data = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 100):
            assert st.percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    assert st.percentile([4, 1, 3, 2], 50) == 2.5
    assert st.percentile([1, 2, 3, 4, 5], 99) == pytest.approx(4.96)
    assert math.isnan(st.percentile([], 50))
    with pytest.raises(ValueError):
        st.percentile([1.0], 101)


def _result(key, c, i, submit, first, end, tokens=10, error=""):
    return st.RequestResult(key, c, i, 20, 10, tokens, submit, first, end, error)


def test_summarize_level():
    res = [
        _result("plain", 2, 0, 0.0, 0.5, 2.0),
        _result("plain", 2, 1, 0.0, 1.0, 3.0),
        _result("plain", 2, 2, 2.0, 2.5, 4.0),
        _result("plain", 2, 3, 3.0, 3.0, 3.5, tokens=0, error="x"),
    ]
    s = st.summarize(res)
    assert (s.scenario, s.concurrency, s.requests, s.errors) == ("plain", 2, 4, 1)
    assert s.output_tokens == 30 and s.wall_s == 4.0 and s.tok_per_s == 7.5
    assert s.latency_p50 == 2.0  # latencies 2, 3, 2 (the failed request is left out)
    assert s.ttft_p50 == 0.5  # TTFTs 0.5, 1.0, 0.5
    assert s.latency_p99 == pytest.approx(st.percentile([2, 3, 2], 99))
    with pytest.raises(ValueError):
        st.summarize([_result("plain", 1, 0, 0, 1, 2), _result("plain", 2, 0, 0, 1, 2)])


def test_closed_loop_times():
    # one request at a time, each 1 s, first token after 0.25 s; two clients
    measured = [(j + 0.25, j + 1.0) for j in range(4)]
    times = st.closed_loop_times(measured, 2)
    assert [t[0] for t in times] == [0.0, 0.0, 1.0, 2.0]
    latencies = [end - submit for submit, _, end in times]
    assert latencies == [1.0, 2.0, 2.0, 2.0]  # steady state: concurrency x service time
    assert st.closed_loop_times(measured, 1)[2][0] == 2.0
    # static batches of two: the next batch's requests are sent when the rows they replace end
    batches = [(0.5, 1.0), (0.5, 2.0), (2.5, 3.0), (2.5, 4.0)]
    assert [t[0] for t in st.closed_loop_times(batches, 2)] == [0.0, 0.0, 1.0, 2.0]


def _stats(key, c, tok_s, pass_index=0):
    return st.LevelStats(key, c, 8, int(tok_s * 10), 10.0, tok_s, 1.0, 2.0, 0.1, 0.2, 0, pass_index=pass_index)


FACTOR = {
    "plain": 1.0,
    "plain_twin": 1.01,
    "unsteered": 0.995,
    "unsteered_off": 1.02,
    "steer_same": 0.985,
    "steer_distinct": 0.96,
    "monitor1": 0.975,
    "monitor3": 0.9,
    "ops": 0.985,
    "policy_monitor3": 0.975,
    "hf_same": 0.5,
    "hf_distinct": 0.1,
}


def _all_stats(levels=(1, 8, 32)):
    return [_stats(s.key, c, 100.0 * c * FACTOR[s.key]) for s in SCENARIOS for c in levels]


def test_ratios_speedup_and_targets():
    stats = _all_stats()
    r = st.ratios(stats)
    assert r[("plain", 8)] == 1.0
    assert st.baseline_rates(stats)[8] == pytest.approx(800.0)
    assert r[("steer_distinct", 32)] == pytest.approx(0.96)
    assert st.speedup(stats, "steer_distinct", "hf_distinct")[32] == pytest.approx(9.6)
    rows = {(row["target"], row["scenario"]): row for row in st.evaluate_targets(stats)}
    assert rows[("2 >= 0.99 x plain vLLM", "unsteered")]["met"]
    assert rows[("3, 4 >= 0.98 x plain vLLM", "steer_same")]["met"]
    assert not rows[("3, 4 >= 0.98 x plain vLLM", "steer_distinct")]["met"]
    assert not rows[("5a, 5b, 5d >= 0.97 x plain vLLM", "monitor3")]["met"]
    assert rows[("5a, 5b, 5d >= 0.97 x plain vLLM", "policy_monitor3")]["met"]
    ops = "5c >= 0.97 x 2 (plugin, unsteered) at concurrency 32"
    assert rows[(ops, "ops")]["met"] and set(rows[(ops, "ops")]["measured"]) == {32}
    assert rows[(ops, "ops")]["measured"][32] == pytest.approx(0.985 / 0.995)
    hf = rows[("4 >= 8 x 6b (HF, distinct specs) at concurrency 32", "steer_distinct")]
    assert hf["met"] and set(hf["measured"]) == {32}
    no32 = st.evaluate_targets(_all_stats(levels=(1, 2)))
    assert not no32[-1]["evaluated"] and not no32[-1]["met"]


def test_ratios_are_per_pass_medians_with_spread():
    # the machine slows down over three passes; the plugin is 2 % slower than plain in each pass
    speed = {0: 1.0, 1: 0.8, 2: 0.9}
    stats = [_stats("plain", 8, 100 * f, p) for p, f in speed.items()]
    stats += [_stats("unsteered", 8, 98 * f, p) for p, f in speed.items()]
    stats += [_stats("hf_distinct", 8, 9.0, -1)]  # measured once: divided by plain's median
    spread = st.ratio_spread(stats)
    # side by side in each pass, the drift cancels: every pass says 0.98
    assert spread[("unsteered", 8)] == st.Ratio(pytest.approx(0.98), pytest.approx(0.98), pytest.approx(0.98), 3)
    # plain's own spread around its median is the noise floor
    assert (spread[("plain", 8)].low, spread[("plain", 8)].high) == (pytest.approx(0.8 / 0.9), pytest.approx(1 / 0.9))
    assert spread[("hf_distinct", 8)].median == pytest.approx(0.1)
    assert st.speedup(stats, "unsteered", "hf_distinct")[8] == pytest.approx(88.2 / 9.0)
    table = rep.ratio_table(stats)
    assert "| 2 plugin, unsteered | 0.980 (0.980-0.980) |" in table
    assert "| 1 vLLM, no plugin | 1.000 (0.889-1.111) |" in table


def test_per_instance_ratios_show_a_server_starts_own_bias():
    # two starts of the servers, two passes each: in start 1 the second plain server happened to
    # run 6 % faster than the first in both passes, in start 2 as fast; the pooled median hides it
    stats = []
    for p, (instance, twin) in enumerate([(0, 1.06), (0, 1.06), (1, 1.0), (1, 1.0)]):
        for key, factor in (("plain", 1.0), ("plain_twin", twin)):
            s = _stats(key, 8, 100 * factor * (1 + p / 10), p)
            s.instance = instance
            stats.append(s)
    assert st.ratio_spread(stats)[("plain_twin", 8)] == st.Ratio(
        pytest.approx(1.03), pytest.approx(1.0), pytest.approx(1.06), 4
    )
    table = rep.instance_table(stats)
    assert "| c=8, start 1 | c=8, start 2 |" in table
    assert "| 1b vLLM, no plugin, second server | 1.060 (1.060-1.060) | 1.000 (1.000-1.000) |" in table
    assert "| 1b vLLM, no plugin, second server | 8 | 2 | 3 |" in rep.full_table(stats)


def test_summaries_are_per_pass_and_skip_missing_ttft():
    results = [
        st.RequestResult("plain", 2, 0, 10, 4, 4, 0.0, math.nan, 1.0, "", 0),
        st.RequestResult("plain", 2, 1, 10, 4, 4, 0.0, math.nan, 2.0, "", 0),
        st.RequestResult("plain", 2, 0, 10, 4, 4, 0.0, math.nan, 4.0, "", 1),
    ]
    stats = st.summarize_all(results)
    assert [(s.pass_index, s.tok_per_s) for s in stats] == [(0, 4.0), (1, 1.0)]
    assert math.isnan(stats[0].ttft_p50) and stats[0].latency_p50 == 1.5


def test_write_report(tmp_path):
    stats = _all_stats()
    requests = [_result("plain", 1, 0, 0.0, 0.1, 1.0)]
    report = rep.Report(
        command="personavec bench --x",
        machine={"CPU": "test cpu"},
        config={"model": "m"},
        stats=stats,
        requests=requests,
        checks=["ok"],
        notes=["n"],
        wall_s=90.0,
    )
    files = rep.write_report(report, tmp_path, "t")
    for key in ("csv", "requests_csv", "markdown", "t_throughput", "t_latency"):
        assert files[key].is_file() and files[key].stat().st_size > 0, key
    for png in (files["t_throughput"], files["t_latency"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["markdown"].read_text()
    assert "personavec bench --x" in md and "test cpu" in md and "1.5 min" in md
    for s in SCENARIOS:
        assert label(s.key) in md
    assert "| 4 steered, distinct specs | 0.960 | 0.960 | 0.960 |" in md  # one pass: no spread
    assert "9.6x" in md and "**no**" in md
    assert "![t_throughput](t_throughput.png)" in md
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(stats)
    row = next(r for r in rows if r["scenario"] == "monitor3" and r["concurrency"] == "8")
    assert float(row["ratio_to_baseline"]) == pytest.approx(0.9) and row["scenario_number"] == "5b"
    with open(files["requests_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 1


def test_cli_has_bench():
    from personavec_vllm import cli

    args, extra = cli.build_parser().parse_known_args(
        ["bench", "--concurrency", "1,2", "--requests", "3", "--output-len", "4:8", "--scenarios", "1,4,6b"]
    )
    assert args.command == "bench" and not extra
    assert args.concurrency == [1, 2] and args.requests == [3]
    assert (args.output_len.min, args.output_len.max) == (4, 8)
    assert args.scenarios == ["plain", "steer_distinct", "hf_distinct"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--scenarios", "7"])


def test_server_env_reaches_both_servers_but_cannot_name_the_plugin():
    from personavec_vllm import cli
    from personavec_vllm.bench.run import Bench

    tunables = "glibc.malloc.mmap_threshold=33554432"
    args = cli.build_parser().parse_args(["bench", "--server-env", f"GLIBC_TUNABLES={tunables}", "--server-env", "A="])
    bench = Bench(args, "test")
    plain, plugin = bench.server_env(plugin=False), bench.server_env(plugin=True)
    assert plain["GLIBC_TUNABLES"] == plugin["GLIBC_TUNABLES"] == tunables and plain["A"] == plugin["A"] == ""
    assert "personavec" not in plain["VLLM_PLUGINS"] and "personavec" in plugin["VLLM_PLUGINS"]
    # scenario 2n's server: the plugin with steering off; every other plugin server steers
    off = bench.server_env(plugin=True, steering_off=True)
    assert "personavec" in off["VLLM_PLUGINS"] and off["PERSONAVEC_STEERING"] == "off"
    assert plugin["PERSONAVEC_STEERING"] == "on" and "PERSONAVEC_STEERING" not in plain
    for bad in ("VLLM_PLUGINS=personavec", "NOEQUALS", "1X=2"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", "--server-env", bad])


def test_proc_stat_reads_cpu_and_page_faults():
    from personavec_vllm.bench.profile import ProcessUsage, proc_stat

    with ProcessUsage.measure({"me": os.getpid(), "gone": 2**22 + 1}) as usage:
        buf = bytearray(64 * 2**20)  # fresh pages from the kernel: faults on first touch
        buf[::4096] = b"x" * len(buf[::4096])
        sum(range(200_000))
    assert usage.minor_faults["me"] >= 1000 and usage.seconds["me"] > 0
    assert math.isnan(usage.seconds["gone"]) and math.isnan(usage.minor_faults["gone"])
    assert math.isnan(usage.huge_mb["gone"]) and usage.huge_mb["me"] >= 0
    assert proc_stat(2**22 + 1) is None


def test_anon_huge_mb_sees_memory_on_transparent_huge_pages():
    import mmap

    from personavec_vllm.bench.profile import anon_huge_mb

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    before = anon_huge_mb(os.getpid())
    region = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # what THP_MEM_ALLOC_ENABLE=1 makes torch do for large tensors
    region[::4096] = b"x" * len(region[::4096])
    try:
        assert anon_huge_mb(os.getpid()) >= before + 16  # at least some of the 64 MB, 2 MB at a time
    finally:
        region.close()
    assert math.isnan(anon_huge_mb(2**22 + 1))


def _cpu_stats(key: str, p: int, tok_per_s: float, worker_cpu_s: float) -> st.LevelStats:
    nan = math.nan
    return st.LevelStats(
        key, 32, 32, 1000, 1000 / tok_per_s, tok_per_s, nan, nan, nan, nan, 0, nan, p, worker_cpu_s * 1.5, worker_cpu_s
    )


def test_cpu_ratios_divide_tokens_per_cpu_second():
    # wall time is noise (other tenants); the plugin's worker spends 2 % more CPU per token
    stats = []
    for p, (plain_rate, plugin_rate) in enumerate([(160, 130), (120, 150), (140, 140)]):
        stats.append(_cpu_stats("plain", p, plain_rate, 10.0 + p))
        stats.append(_cpu_stats("unsteered", p, plugin_rate, (10.0 + p) * 1.02))
    cpu = st.ratio_spread(stats, metric="tok_per_worker_cpu_s")[("unsteered", 32)]
    assert cpu.median == pytest.approx(1 / 1.02) and cpu.high - cpu.low == pytest.approx(0, abs=1e-12)
    assert st.ratio_spread(stats)[("unsteered", 32)].high > 1.2  # the wall-clock ratio is not
    md = rep.ratio_table(stats, "tok_per_server_cpu_s")
    assert "0.980" in md and "plugin, unsteered" in md


def test_profile_counts_only_our_own_time(tmp_path):
    from personavec_vllm.bench.profile import owner, summarize_stacks

    site, ours = "/venv/lib/python3.11/site-packages", "/src/personavec_vllm"
    fwd = f"forward ({site}/vllm/model_executor/models/llama.py:300)"
    raw = tmp_path / "worker.txt"
    raw.write_text(
        "\n".join(
            [  # our hook wrapping vLLM's forward: vLLM's time
                f"_model_forward ({ours}/engine/worker.py:290);{fwd} 90",
                # our op, called by vLLM's layer: ours
                f"{fwd};steer_and_capture ({ours}/engine/op.py:60) 4",
                # step planning inside our hook, torch below it: ours
                f"_prepare_inputs ({ours}/engine/worker.py:285);plan_step ({ours}/engine/worker.py:170);"
                f"set_token_rows ({ours}/engine/tables.py:360);copy_ ({site}/torch/_tensor.py:1) 3",
                "run (/usr/lib/python3.11/threading.py:10) 3",
                "not a sample line",
            ]
        )
    )
    s = summarize_stacks(raw)
    assert (s.samples, s.ours) == (100, 7) and s.ours_share == pytest.approx(0.07)
    assert s.ours_interval == pytest.approx((0.0343, 0.1375), abs=5e-5)  # Wilson's 7 of 100, as tabulated
    assert dict(s.by_function) == {"engine.op.steer_and_capture": 4, "engine.tables.set_token_rows": 3}
    assert owner(f"{fwd}") is None
    assert summarize_stacks(tmp_path / "missing.txt").samples == 0


def test_chat_servers_leave_room_for_the_template():
    # the longest chat prompt, rendered by the model's chat template, plus its output must fit the
    # servers' --max-model-len (it did not: such requests came back with fewer tokens than asked)
    import argparse

    from transformers import AutoTokenizer

    from personavec_vllm.bench.options import add_arguments
    from personavec_vllm.bench.run import Bench
    from personavec_vllm.bench.workload import with_fresh_words
    from personavec_vllm.models import resolve_model

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--prompt-len", "512", "--output-len", "96"])
    bench = Bench(args, "test")
    bench.model = str(resolve_model(None))
    bench.tokenizer = AutoTokenizer.from_pretrained(bench.model)
    vocab = word_vocab(bench.tokenizer)
    cfg = WorkloadConfig(0, LengthRange(512, 512), 0.6, LengthRange(96, 96))
    longest = 0
    for seed in range(4):
        for req in with_fresh_words(make_workload(cfg, 4, vocab), vocab, seed, bench.tokenizer.decode):
            msgs = [{"role": "user", "content": req.text}]
            text = bench.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            longest = max(longest, len(bench.tokenizer(text, add_special_tokens=False)["input_ids"]))
    argv = bench.server_args("<vectors>")
    max_len = int(argv[argv.index("--max-model-len") + 1])
    assert longest > 512 and longest + 96 <= max_len


# ---- the whole benchmark ---------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, tiny_llama):
    from personavec_vllm.bench.options import main

    out = tmp_path / "results"
    code = main(
        [
            "--model",
            str(tiny_llama),
            "--enforce-eager",
            "--concurrency",
            "1,2",
            "--requests",
            "3",
            "--prompt-len",
            "16:48",
            "--output-len",
            "4:6",
            "--out",
            str(out),
            "--no-progress",
            "--passes",
            "1",
            "--instances",
            "2",
            "--profile",
            "--server-env",
            "PERSONAVEC_BENCH_SMOKE=1",
            "--vllm-args",
            "--num-gpu-blocks-override 64",  # a small KV cache: the warm-up fills it in seconds
        ]
    )
    assert code == 0
    md = (out / "serving.md").read_text()
    assert "server environment (both): PERSONAVEC_BENCH_SMOKE=1" in md
    scenarios = list(SCENARIOS)
    for s in scenarios:
        assert label(s.key) in md, s.key
    assert "--enforce-eager" in md
    with open(out / "serving.csv") as f:
        rows = list(csv.DictReader(f))
    server = [s for s in scenarios if s.group != "hf"]
    measured = {(r["scenario"], r["concurrency"], r["pass_index"]) for r in rows}
    assert measured == {(s.key, c, p) for s in server for c in ("1", "2") for p in ("0", "1")} | {
        (s.key, c, "-1") for s in scenarios if s.group == "hf" for c in ("1", "2")
    }
    assert all(r["errors"] == "0" and float(r["tok_per_s"]) > 0 for r in rows)
    # every server measurement counted its processes' CPU; the profiled pass is not in the rows
    assert all(
        float(r["worker_cpu_s"]) > 0 and float(r["server_cpu_s"]) > float(r["worker_cpu_s"])
        for r in rows
        if r["pass_index"] != "-1"
    )
    assert all(
        float(r["prompt_tokens_computed"]) > 0
        and r["preemptions"] == "0"
        and float(r["engine_steps"]) > 0
        and float(r["worker_minor_faults"]) >= 0
        for r in rows
        if r["pass_index"] != "-1"
    )
    assert "## Output tokens per CPU second relative to plain vLLM" in md
    profile = md.split("## Where the time goes", 1)[1].split("\n## ", 1)[0]
    for s in server:
        for role in ("api server", "engine core", "worker"):
            assert f"| {label(s.key)} | 2 | {role} |" in profile, (s.key, role)
    from personavec_vllm.bench.profile import summarize_stacks

    sampled = [summarize_stacks(f).samples for f in (out / "serving_profile").glob("*_worker.txt")]
    assert len(sampled) == 2 * len(server) and sum(sampled) > 0  # py-spy sampled the workers
    assert all(int(r["output_tokens"]) == int(rows[0]["output_tokens"]) for r in rows)  # same work everywhere
    for png in ("serving_throughput.png", "serving_latency.png"):
        assert (out / png).stat().st_size > 1000
    assert "ignores persona fields" in md and "changes the greedy output" in md


def test_op_micro_benchmark_runs_every_load():
    from personavec_vllm.bench import op_micro

    res = op_micro.measure(hidden=64, intermediate=128, tokens=8, vectors=2, repeats=2, device="cpu")
    assert res["layer_matmuls_s"] > 0 and len(res["loads"]) == 4
    assert all(row["op_s"] > 0 and row["op_over_layer_matmuls"] > 0 for row in res["loads"].values())


def test_plots_of_a_non_streaming_run(tmp_path):
    """Without streaming there is no time to first token (NaN): the latency plot leaves that
    panel out instead of failing on a log axis with no positive value (it did, after a 50-minute
    run, before the Markdown report was written)."""
    from personavec_vllm.bench.plots import write_plots

    stats = []
    for p in range(2):
        for key in ("plain", "unsteered"):
            for c in (32, 64):
                s = _stats(key, c, 100.0 + p + c / 10, pass_index=p)
                s.ttft_p50 = s.ttft_p99 = math.nan
                stats.append(s)
    paths = write_plots(stats, tmp_path, "x")
    assert [p.name for p in paths] == ["x_throughput.png", "x_latency.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_log_axis_between_two_powers_of_ten_has_labels():
    """The throughput plot of 13-80 tok/s had no y labels: a log axis labels only powers of ten."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from personavec_vllm.bench.plots import _label_log_y

    fig, ax = plt.subplots()
    ax.plot([32, 64], [12.9, 80.1])
    ax.set(yscale="log")
    _label_log_y(ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and low <= float(t.get_text()) <= high]
    plt.close(fig)
    assert shown == ["20", "50"]


def test_worker_op_profile_reads_the_torch_profiler_table(tmp_path):
    """benchmarks/worker_op_profile.py parses the table vLLM's worker writes (torch's own
    `key_averages().table`), per op and output token, against the profiler's own numbers."""
    import importlib.util
    import json

    import torch

    spec = importlib.util.spec_from_file_location("worker_op_profile", ROOT / "benchmarks" / "worker_op_profile.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    averages = {}
    for name, size in (("plain", 64), ("plugin", 128)):
        folder = tmp_path / name
        folder.mkdir()
        a = torch.randn(size, size)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                a = torch.mm(a, a).tanh()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=50)
        (folder / "rank0.profiler_out.txt").write_text(table)
        (folder / "tokens.json").write_text(json.dumps({"tokens": 10}))
        averages[name] = {e.key: e for e in prof.key_averages()}
    rows, total, tokens = tool.worker_table(tmp_path / "plugin")
    mm = averages["plugin"]["aten::mm"]
    assert tokens == 10 and rows["aten::mm"][1] == mm.count == 5
    assert rows["aten::mm"][0] == pytest.approx(mm.self_cpu_time_total / 1000, rel=0.01, abs=0.002)
    assert total >= rows["aten::mm"][0]
    report = tool.compare(tmp_path, "plain", "plugin")
    assert "| `aten::mm` |" in report and "| 5 | 5 |" in report


def test_engine_overhead_pairs_rounds_and_intervals_the_mean():
    from personavec_vllm.bench.engine_overhead import LOADS, paired_ratio, rotated

    orders = [rotated(LOADS, r) for r in range(len(LOADS))]
    assert {o[0] for o in orders} == set(LOADS) and all(sorted(o) == sorted(LOADS) for o in orders)
    flat = paired_ratio([1.0] * 8)
    assert (flat.mean, flat.ci_low, flat.ci_high, flat.rounds) == (1.0, 1.0, 1.0, 8)
    rng = random.Random(0)
    noisy = [0.97 + rng.gauss(0, 0.02) for _ in range(40)]
    s = paired_ratio(noisy)
    assert s.low < s.ci_low < s.mean < s.ci_high < s.high
    assert s.ci_high < 1.0  # 40 rounds resolve a 3 % cost under 2 % noise per round
    assert abs((s.ci_high - s.ci_low) - 2 * 1.96 * statistics.stdev(noisy) / len(noisy) ** 0.5) < 0.004


def test_engine_overhead_pools_rounds_of_like_runs_and_refuses_unlike_ones(tmp_path):
    import json
    import subprocess

    from personavec_vllm.bench.engine_overhead import LOADS, summarize

    rng = random.Random(1)

    def run(rounds: int, concurrency: int) -> dict:
        speed = [80 * (1 + rng.gauss(0, 0.05)) for _ in range(rounds)]  # the machine's drift, shared by a round
        rates = {load: [v * (1 + rng.gauss(0, 0.02)) for v in speed] for load in LOADS[:2]}
        both = [(a * b) ** 0.5 for a, b in zip(*rates.values())]
        rates["steer_distinct"] = [0.97 * b for b in both]
        rates["monitor3"] = [0.99 * b for b in both]
        meta = {"model": "m", "vectors": "v", "workload": "w", "mode": "compiled", "machine": "x"}
        return {
            **meta,
            "command": f"run {rounds}",
            "concurrency": concurrency,
            "tok_per_s": rates,
            "tok_per_cpu_s": rates,
        }

    runs = {"a": run(6, 32), "b": run(4, 32), "c64": run(3, 64)}
    for name, result in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "engine_overhead.json").write_text(json.dumps(result))
    module = [sys.executable, "-m", "personavec_vllm.bench.engine_overhead", "--pool"]

    done = subprocess.run(
        [*module, str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")],
        capture_output=True,
        text=True,
        check=True,
    )
    pooled = json.loads((tmp_path / "ab" / "engine_overhead.json").read_text())
    assert [p["command"] for p in pooled["pooled_from"]] == ["run 6", "run 4"]
    assert all(len(pooled["tok_per_s"][load]) == 10 for load in LOADS)
    expected = summarize(
        {k: runs["a"]["tok_per_s"][k] + runs["b"]["tok_per_s"][k] for k in LOADS},
        {k: runs["a"]["tok_per_cpu_s"][k] + runs["b"]["tok_per_cpu_s"][k] for k in LOADS},
    )
    assert pooled["ratio"]["tok_per_s"]["steer_distinct"]["mean"] == pytest.approx(
        expected["tok_per_s"]["steer_distinct"].mean
    )
    assert pooled["ratio"]["tok_per_s"]["steer_distinct"]["rounds"] == 10
    # over both unsteered loads the simulated cost comes back exactly; over one it carries that load's noise
    vs_both = pooled["ratio"]["tok_per_s_vs_both_unsteered"]
    assert vs_both["steer_distinct"]["mean"] == pytest.approx(0.97) and vs_both["monitor3"]["mean"] == pytest.approx(
        0.99
    )
    assert vs_both["steer_distinct"]["ci_high"] - vs_both["steer_distinct"]["ci_low"] < 1e-9
    assert (
        pooled["ratio"]["tok_per_s"]["steer_distinct"]["high"] - pooled["ratio"]["tok_per_s"]["steer_distinct"]["low"]
        > 0.01
    )
    assert "| steer_distinct |" in done.stdout and (tmp_path / "ab" / "engine_overhead.png").exists()

    refused = subprocess.run([*module, str(tmp_path / "a"), str(tmp_path / "c64")], capture_output=True, text=True)
    assert refused.returncode != 0 and "concurrency" in refused.stderr and "c64" in refused.stderr


def test_share_interval_is_wilsons_and_stays_in_bounds():
    lo, hi = st.share_interval(0, 100)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (100 + 1.96**2))  # no hits: still an upper bound
    lo, hi = st.share_interval(100, 100)
    assert hi == pytest.approx(1.0) and hi <= 1.0 and lo < 1.0
    lo, hi = st.share_interval(34, 2689)  # steer_distinct's worker at c=32 in results/overhead
    assert lo < 34 / 2689 < hi and hi - lo < 0.01
    assert all(math.isnan(x) for x in st.share_interval(0, 0))
