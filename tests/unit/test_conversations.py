"""Multi-turn conversations: the spec's grammar, sessions whose history grows by each turn's
input and output, a shared system prompt, the context cap, the workload spec's description and
context, which commands replay a trace, and the prefix-cache hit rate scraped per load point."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import Behaviour, FakeServer
from tuner.cli.common import workload_spec
from tuner.errors import ParameterError
from tuner.load.conversations import ConversationSpec, conversation_plan
from tuner.load.generator import LoadConfig
from tuner.load.prompts import LengthRange, load_tokenizer
from tuner.load.workload import WorkloadSpec, build_requests, dataset_source
from tuner.measure.bench import measure
from tuner.measure.scrape import PREFIX_HITS, PREFIX_QUERIES, Sample, summarize_samples

EXAMPLE = Path(__file__).resolve().parents[2] / "tuner" / "data" / "traces" / "example.jsonl"


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def test_spec_grammar() -> None:
    assert ConversationSpec.parse("conversations") == ConversationSpec()
    spec = ConversationSpec.parse("conversations:turns=3-5, think=2.5s,system=64,ctx=900,users=8")
    assert spec == ConversationSpec(LengthRange(3, 5), 2.5, 64, 900, 8)
    for bad in (
        "conversations:turns",
        "conversations:colour=red",
        "conversations:think=soon",
        "conversations:users=0",
        "conversations:think=-1",
        "chats",
    ):
        with pytest.raises(ParameterError):
            ConversationSpec.parse(bad)


def test_history_grows_by_each_turns_input_and_output() -> None:
    spec = ConversationSpec(turns=LengthRange.fixed(4), think_s=1.0, system_len=50, users=3)
    plan = conversation_plan(spec, LengthRange(10, 30), LengthRange(5, 9), 24, seed=1)
    assert len(plan) == 24
    sessions: dict[str, list[Any]] = {}
    for r in plan:
        sessions.setdefault(str(r.session), []).append(r)
    for turns in sessions.values():
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert 50 + 10 <= turns[0].input_tokens <= 50 + 30 and turns[0].think_s == 0.0
        for a, b in itertools.pairwise(turns):
            user = b.input_tokens - (a.input_tokens + a.output_tokens)
            assert 10 <= user <= 30  # the history is the earlier prompt and answer, plus new
    assert any(t.think_s > 0 for ts in sessions.values() for t in ts[1:])
    assert [r.session for r in plan[:3]] == ["c0", "c1", "c2"]  # three users interleaved


def test_sessions_end_before_the_context_cap_and_an_impossible_first_turn_is_refused() -> None:
    spec = ConversationSpec(turns=LengthRange.fixed(50), system_len=10, max_context=200)
    plan = conversation_plan(spec, LengthRange.fixed(30), LengthRange.fixed(20), 40)
    assert max(r.input_tokens + r.output_tokens for r in plan) <= 200
    with pytest.raises(ParameterError, match="more than ctx=100"):
        conversation_plan(
            ConversationSpec(system_len=90, max_context=100),
            LengthRange.fixed(20),
            LengthRange.fixed(5),
            4,
        )


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_requests_share_the_system_prompt_and_carry_the_history(tok: Any, endpoint: str) -> None:
    spec = WorkloadSpec(
        num_prompts=12,
        input_len=LengthRange(8, 12),
        output_len=LengthRange.fixed(4),
        conversations=ConversationSpec(turns=LengthRange.fixed(3), system_len=16, users=2),
        num_prefixes=2,
    )
    reqs = build_requests(tok, spec, endpoint=endpoint)  # type: ignore[arg-type]
    assert reqs == build_requests(tok, spec, endpoint=endpoint)  # type: ignore[arg-type]
    by_session: dict[str, list[Any]] = {}
    for r in reqs:
        by_session.setdefault(str(r.session), []).append(r)
    c0, c1, c2 = by_session["c0"], by_session["c1"], by_session["c2"]
    if endpoint == "completions":
        assert c0[0].prompt[:16] == c2[0].prompt[:16] != c1[0].prompt[:16]  # system 0, 1, 0
        assert c0[1].prompt[: c0[0].prompt_len] == c0[0].prompt
        assert c0[2].prompt[: c0[1].prompt_len] == c0[1].prompt
    else:
        assert all(isinstance(r.prompt, str) for r in reqs)
        assert c0[1].prompt.startswith(c0[0].prompt[:20])
    assert all(r.think_s == 0 for r in (c0[0], c1[0])) and c0[1].turn == 1


def test_workload_spec_describes_and_sizes_conversations_and_traces() -> None:
    conv = WorkloadSpec(
        input_len=LengthRange.fixed(100),
        output_len=LengthRange.fixed(50),
        conversations=ConversationSpec(turns=LengthRange.fixed(2), system_len=0),
        prefix_len=20,
    )
    d = conv.describe()
    assert d["dataset"] == "conversations" and d["conversations"]["system_len"] == 20
    # Turn 0: 20 + 100 + 50 = 170; turn 1: 170 + 100 + 50 = 320.
    assert conv.context_len() == 245 and conv.shares_prefixes
    trace = WorkloadSpec(trace=EXAMPLE, output_len=None)
    t = trace.describe()
    assert t["dataset"] == f"trace:{EXAMPLE}" and len(t["trace_sha256"]) == 16
    assert t["replay"] is False and "time_scale" not in t
    assert 100 < trace.context_len() < 600 and trace.shares_prefixes
    assert WorkloadSpec().describe() == {
        "num_prompts": 100,
        "dataset": "random",
        "input_len": "256",
        "output_len": "128",
        "prefix_len": 0,
        "num_prefixes": 1,
        "seed": 0,
    }  # unchanged: a search's study name hashes it
    with pytest.raises(ParameterError, match="one dataset"):
        WorkloadSpec(trace=EXAMPLE, conversations=ConversationSpec())
    with pytest.raises(ParameterError, match="only a trace"):
        WorkloadSpec(replay=True)


def _options(dataset: str | None, **more: Any) -> dict[str, Any]:
    return {
        "input_len": LengthRange.fixed(32),
        "output_len": None,
        "dataset": dataset_source(dataset),
        "prefix_len": 0,
        "num_prefixes": 1,
        "seed": 0,
        "time_scale": None,
        **more,
    }


def test_bench_replays_a_trace_unless_given_a_rate_and_a_search_resamples() -> None:
    trace = f"trace:{EXAMPLE}"
    bench = workload_spec(_options(trace, rate=None, concurrency=None, time_scale=0.5))
    assert bench.replay and bench.time_scale == 0.5 and bench.output_len is None
    assert not workload_spec(_options(trace, rate=3.0, concurrency=None)).replay
    assert not workload_spec(_options(trace, rate=None, concurrency=4)).replay
    assert not workload_spec(_options(trace, latency_rate=None)).replay  # vtune search
    with pytest.raises(ParameterError, match="--time-scale replays a trace"):
        workload_spec(_options(trace, latency_rate=None, time_scale=2.0))
    conv = workload_spec(_options("conversations:turns=2"))
    assert conv.conversations is not None and conv.output_len == LengthRange.fixed(128)


def test_prefix_cache_hit_rate_is_the_delta_over_the_window() -> None:
    samples = [
        Sample(0.0, {PREFIX_QUERIES: 100.0, PREFIX_HITS: 10.0}),
        Sample(1.0, {PREFIX_QUERIES: 300.0, PREFIX_HITS: 160.0}),
    ]
    stats = summarize_samples(samples, 0.0, 1.0)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (200.0, 150.0)
    assert stats.prefix_cache_hit_rate == 0.75 and stats.to_json()["prefix_cache_hit_rate"] == 0.75
    assert summarize_samples([Sample(0.0, {})]).prefix_cache_hit_rate is None


@pytest.mark.parametrize("caching", [True, False])
def test_a_conversation_load_point_records_the_servers_prefix_cache_hits(
    tok: Any, caching: bool
) -> None:
    spec = WorkloadSpec(
        num_prompts=24,
        input_len=LengthRange.fixed(20),
        output_len=LengthRange.fixed(4),
        conversations=ConversationSpec(turns=LengthRange.fixed(3), think_s=0.0, system_len=32),
    )
    reqs = build_requests(tok, spec, extra=2)

    async def go() -> Any:
        async with FakeServer(Behaviour(), prefix_caching=caching) as srv:
            cfg = LoadConfig(rate=200.0, warmup=2, timeout_s=10)
            return await measure(srv.url, "fake", reqs, cfg, scrape_interval=0.05)

    m = asyncio.run(go())
    assert m.summary.failed == 0 and m.server is not None
    rate = m.server.to_json()["prefix_cache_hit_rate"]
    if caching:
        assert rate is not None and rate > 0.3  # system prompt and history come back cached
    else:
        assert rate == 0.0
