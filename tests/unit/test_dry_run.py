"""``vtune search --dry-run`` (issue 16): the order that will actually run, the first rows and a
count rather than a wall of candidates; ``--all`` lists everything, ``--json`` gives the whole
plan to tools. A bundled card needs no engine and no network."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tests.configs import TINY_LLAMA_CONFIG
from tuner.cli import cli
from tuner.cli.search import tune_config
from tuner.search.prepare import prepare
from tuner.search.runner import trial_order

CONFIG = TINY_LLAMA_CONFIG
ARGV = ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--gpu", "h100", "--budget", "20"]


def dry_run(*extra: str) -> CliRunner:
    result = CliRunner().invoke(cli, ["search", *ARGV, "--dry-run", *extra])
    assert result.exit_code == 0, result.output
    return result


def names_listed(text: str) -> list[str]:
    """The candidate column of the plan's tables (rows start with their # )."""
    return [w[1] for w in map(str.split, text.splitlines()) if w and w[0].isdigit()]


def test_the_dry_run_shows_the_order_that_runs_not_a_wall():
    prep = prepare(tune_config(ARGV))
    order = trial_order(prep.plan, prep.config.settings)
    assert order.sampler == "TPE" and len(order.candidates) > 200  # the 8B/H100 plan is big
    text = dry_run().stdout
    lines = text.splitlines()
    assert len(lines) < 45, len(lines)  # was 336 lines
    n, rest = len(order.queued), len(order.rest)
    assert f"the first {n} run in this order, then TPE chooses among the other {rest}" in text
    assert f"TPE chooses among these {rest}, best predicted first (--budget 20: {20 - n} more" in (
        text.replace("\n", " ")
    )
    listed = names_listed(text)
    assert listed == [p.name for p in order.candidates[: len(listed)]]
    assert listed[:n] == [p.name for p in order.queued] and listed[0] == "vllm-defaults"
    more = len(order.candidates) - len(listed)
    assert f"... and {more} more" in text and "--all" in text and "--json" in text
    assert "…" not in text  # the candidates' names are whole at 80 columns
    counts = prep.plan.counts_by_rule()
    for rule, count in counts.items():
        assert f"Pruned {count} by {rule}, e.g. " in text.replace("\n", " ")


def test_all_lists_every_candidate_pruned_and_capped_ones_too():
    prep = prepare(tune_config(ARGV))
    order = trial_order(prep.plan, prep.config.settings)
    text = dry_run("--all").stdout
    assert names_listed(text) == [p.name for p in order.candidates]
    joined = text.replace("\n", " ")
    for pruned in prep.plan.pruned:
        assert f"pruned [{pruned.rule}] {pruned.candidate.name}:" in joined
    assert "... and" not in text


def test_json_is_the_whole_plan_for_tools():
    prep = prepare(tune_config(ARGV))
    order = trial_order(prep.plan, prep.config.settings)
    result = dry_run("--json")
    plan = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert plan["schema"] == "vtune.plan/1" and plan["study"] == prep.study_name
    assert plan["sampler"] == "TPE" and plan["budget"] == 20
    assert [c["name"] for c in plan["candidates"]] == [p.name for p in order.candidates]
    queued = [c["name"] for c in plan["candidates"] if c["queued"]]
    assert queued == [p.name for p in order.queued]
    first = plan["candidates"][1]
    assert first["predicted_tokens_per_s"] == order.candidates[1].predicted_tokens_per_s
    assert first["knobs"] == order.candidates[1].candidate.knobs()
    assert {"max_concurrency", "roofline_knee_batch", "kv_capacity_tokens"} <= set(first)
    assert len(plan["pruned"]) == len(prep.plan.pruned) > 0
    assert {"name", "knobs", "rule", "reason"} == set(plan["pruned"][0])
    assert plan["counts"] == {
        "space": prep.plan.space_size,
        "candidates": len(order.candidates),
        "queued": len(order.queued),
        "sampled_from": len(order.rest),
        "pruned": len(prep.plan.pruned),
        "capped": len(prep.plan.capped),
        "pruned_by_rule": prep.plan.counts_by_rule(),
    }
    assert plan["estimated_seconds"] == round(prep.estimated_seconds(), 1)
    assert plan["profile"].endswith("h100-sxm.yaml")


def test_a_grid_lists_its_whole_order_and_json_needs_dry_run(tmp_path, capsys):
    from tuner.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    argv = ["--model", str(tmp_path / "m"), "--gpu", "cpu", "--param", "max_num_seqs=16,64"]
    result = CliRunner().invoke(cli, ["search", *argv, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Trial order, all 3: vLLM's defaults, then best predicted" in result.stdout
    assert names_listed(result.stdout)[0] == "vllm-defaults" and "chooses" not in result.stdout
    plan = json.loads(CliRunner().invoke(cli, ["search", *argv, "--dry-run", "--json"]).stdout)
    assert plan["sampler"] is None and all(c["queued"] for c in plan["candidates"])
    try:
        main(["search", *argv, "--json", "--out", str(tmp_path)])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json prints the plan of a --dry-run" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # nothing started, nothing written
