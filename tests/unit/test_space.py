"""Candidates, overrides, space files, pruning rules and the plan."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tuner.analytic.estimate import ServingConfig
from tuner.errors import ParameterError
from tuner.plan.prune import (
    RULE_DEFAULTS,
    RULE_DOMINATED,
    RULE_INVALID,
    RULE_KV,
    RULE_NO_CHUNKED,
    RULE_NO_FIT,
    RULE_UNSUPPORTED,
    Pruned,
    Target,
    Variant,
    default_space,
    evaluate,
    feasible_concurrency,
    normalize,
    plan,
)
from tuner.plan.space import Candidate, Space, load_space_file, parse_param_overrides
from tuner.plan.variants import serving_values
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model
from tuner.specs.vllm_defaults import vllm_defaults


def target(
    gpu: str = "h100",
    model: str = "llama-3.1-8b",
    context: int = 2048,
    max_model_len: int = 8192,
    **variants: str,
) -> Target:
    spec = load_model(model)
    vs = {"none": Variant("none", spec.name, spec)}
    for name, flag in variants.items():
        vs[name] = Variant(name, spec.name, spec, flag=flag, source="online")
    return Target(get_gpu(gpu), vs, context_len=context, max_model_len=max_model_len)


def test_candidate_name_args_and_baseline() -> None:
    base = Candidate()
    assert base.is_baseline and base.name == "vllm-defaults" and base.to_vllm_args() == []
    cand = Candidate(
        max_num_seqs=64, enable_chunked_prefill=False, kv_cache_dtype="fp8", quantization="awq-ckpt"
    )
    assert cand.name == "seqs64-kvfp8-cp0-qawq-ckpt"
    assert cand.to_vllm_args("awq") == [
        "--max-num-seqs",
        "64",
        "--kv-cache-dtype",
        "fp8",
        "--no-enable-chunked-prefill",
        "--quantization",
        "awq",
    ]
    assert "--quantization" not in cand.to_vllm_args(None)


def test_param_overrides() -> None:
    out = parse_param_overrides(["max_num_seqs=16,64,256", "enable-prefix-caching=true,off"])
    assert out == {"max_num_seqs": (16, 64, 256), "enable_prefix_caching": (True, False)}
    with pytest.raises(ParameterError, match="unknown parameter 'max_seqs'"):
        parse_param_overrides(["max_seqs=4"])
    with pytest.raises(ParameterError, match="bad value"):
        parse_param_overrides(["max_num_seqs=lots"])
    with pytest.raises(ParameterError, match="positive"):
        parse_param_overrides(["max_num_seqs=0"])
    with pytest.raises(ParameterError, match="NAME=V1"):
        parse_param_overrides(["max_num_seqs"])
    with pytest.raises(ParameterError, match=r"\(0, 1\]"):
        parse_param_overrides(["gpu_memory_utilization=1.5"])


def test_space_file(tmp_path: Path) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("max-num-seqs: [8, 32]\nenable_prefix_caching: true\n")
    assert load_space_file(f) == {"max_num_seqs": (8, 32), "enable_prefix_caching": (True,)}
    f.write_text("max_num_seqs: [8\n")
    with pytest.raises(ParameterError, match="not valid YAML"):
        load_space_file(f)
    with pytest.raises(ParameterError, match="cannot read"):
        load_space_file(tmp_path / "missing.yaml")


def test_grid_enumeration() -> None:
    space = Space({"max_num_seqs": (8, 16), "kv_cache_dtype": ("auto", "fp8")})
    assert space.size() == 4 and len(set(space.candidates())) == 4


def test_unsupported_method_and_kv_dtype_are_pruned() -> None:
    t = target("a100-80gb", fp8="fp8")
    assert evaluate(Candidate(quantization="fp8"), t).rule == RULE_UNSUPPORTED  # type: ignore
    assert evaluate(Candidate(kv_cache_dtype="fp8"), t).rule == RULE_UNSUPPORTED  # type: ignore


def test_batched_tokens_rules() -> None:
    t = target()
    no_cp = evaluate(Candidate(max_num_batched_tokens=2048, enable_chunked_prefill=False), t)
    assert isinstance(no_cp, Pruned) and no_cp.rule == RULE_NO_CHUNKED
    with_cp = evaluate(Candidate(max_num_batched_tokens=2048, enable_chunked_prefill=True), t)
    assert not isinstance(with_cp, Pruned)
    small = evaluate(Candidate(max_num_seqs=512, max_num_batched_tokens=256), t)
    assert isinstance(small, Pruned) and small.rule == RULE_INVALID


def test_does_not_fit() -> None:
    t = target("l4", model="llama-3.1-70b")
    outcome = evaluate(Candidate(max_num_seqs=16), t)
    assert isinstance(outcome, Pruned) and outcome.rule == RULE_NO_FIT


def test_kv_capacity_caps_max_num_seqs() -> None:
    t = target("a100-40gb", context=8192)
    planned, cap = evaluate(Candidate(max_num_seqs=64), t)  # type: ignore[misc]
    assert cap is not None and planned.candidate.max_num_seqs < 64
    assert planned.candidate.max_num_seqs == int(planned.max_concurrency)


def test_dominated() -> None:
    t = target("a100-40gb", context=8192)
    outcome = evaluate(Candidate(max_num_seqs=4096, max_num_batched_tokens=8192), t)
    assert isinstance(outcome, Pruned) and outcome.rule == RULE_DOMINATED


def test_plan_orders_by_prediction_and_dedupes_caps() -> None:
    t = target("a100-40gb", context=8192)
    p = plan(Space({"max_num_seqs": (8, 64, 128)}), t)
    names = [c.name for c in p.candidates]
    assert len(names) == len(set(names))
    preds = [c.predicted_tokens_per_s for c in p.candidates]
    assert preds == sorted(preds, reverse=True)
    assert p.baseline.candidate.is_baseline
    # 64 and 128 both cap to what fits: one survives, the other is pruned as a repeat.
    assert any(pr.rule == RULE_KV for pr in p.pruned)


def test_first_picks_skip_ties_of_the_analytic_model() -> None:
    # max_num_batched_tokens does not change the decode prediction: per max_num_seqs, ties.
    t = target("cpu", model="qwen2.5-0.5b", context=512, max_model_len=2048)
    p = plan(Space({"max_num_seqs": (8, 32, 128), "max_num_batched_tokens": (1024, 4096)}), t)
    picks = p.first_picks(3)
    assert picks[0].candidate.is_baseline
    assert [c.candidate.max_num_seqs for c in picks[1:]] == [128, 32, 8]
    # Fewer distinct predictions than asked: the ties fill up, best first, no repeats.
    more = p.first_picks(5)
    assert [c.candidate.max_num_seqs for c in more[1:]] == [128, 32, 8, 128, 32]
    assert len({c.name for c in more}) == 6


def test_candidate_equal_to_vllm_defaults_is_left_to_the_baseline() -> None:
    # vLLM 0.32 on CPU: max_num_seqs 128, max_num_batched_tokens 2048 when unset.
    t = target("cpu", model="qwen2.5-0.5b", context=512, max_model_len=2048)
    p = plan(Space({"max_num_seqs": (64, 128), "max_num_batched_tokens": (2048, 4096)}), t)
    dropped = [pr for pr in p.pruned if pr.rule == RULE_DEFAULTS]
    assert [pr.candidate.name for pr in dropped] == ["seqs128-mbt2048"]
    assert "measured by the baseline" in dropped[0].reason
    assert {c.name for c in p.candidates} == {"seqs64-mbt2048", "seqs64-mbt4096", "seqs128-mbt4096"}
    # A knob vtune does not model the default of (block size) is never taken for the defaults,
    # nor is chunked prefill off, whose token budget follows max_model_len.
    for extra in ({"block_size": (128,)}, {"enable_chunked_prefill": (False,)}):
        space = Space({"max_num_seqs": (128,), "max_num_batched_tokens": (2048,), **extra})
        assert not [pr for pr in plan(space, t).pruned if pr.rule == RULE_DEFAULTS]
    # On an H100 the defaults are 1024 / 8192 (and gpu_memory_utilization 0.92: vLLM 0.32's
    # CacheConfig; 0.9 was older vLLM's, and what this rule wrongly assumed).
    h = target("h100", model="qwen2.5-0.5b", context=512)
    space = Space(
        {
            "max_num_seqs": (1024,),
            "max_num_batched_tokens": (8192,),
            "gpu_memory_utilization": (0.9, 0.92, 0.95),
        }
    )
    assert [pr.candidate.name for pr in plan(space, h).pruned if pr.rule == RULE_DEFAULTS] == [
        "seqs1024-mbt8192-gmu0.92"
    ]


def test_baseline_estimate_and_same_as_defaults_agree_on_vllm_defaults() -> None:
    # The baseline is estimated with the defaults the same-as-defaults rule compares with: a
    # candidate that survives never has the baseline's KV pool at the baseline's batch limits
    # (it would be the baseline, measured twice), and the one pruned sets vLLM's own value.
    h = target("h100", model="qwen2.5-0.5b", context=512)
    gmus = (0.85, 0.9, 0.92, 0.95)
    p = plan(
        Space(
            {
                "max_num_seqs": (1024,),
                "max_num_batched_tokens": (8192,),
                "gpu_memory_utilization": gmus,
            }
        ),
        h,
    )
    assert len(p.candidates) == len(gmus) - 1
    assert all(c.kv_capacity_tokens != p.baseline.kv_capacity_tokens for c in p.candidates)
    same = [pr.candidate for pr in p.pruned if pr.rule == RULE_DEFAULTS]
    assert [c.gpu_memory_utilization for c in same] == [vllm_defaults().gpu_memory_utilization]
    assert ServingConfig().gpu_memory_utilization == vllm_defaults().gpu_memory_utilization


def test_single_variant_quantization_is_normalized_by_evaluate() -> None:
    one = target()
    planned, _ = evaluate(Candidate(max_num_seqs=64, quantization="none"), one)  # type: ignore
    assert planned.name == "seqs64" and normalize(Candidate(quantization="none"), one).is_baseline
    pruned = evaluate(Candidate(max_num_seqs=4096, quantization="none"), one)
    assert isinstance(pruned, Pruned) and pruned.candidate.name == "seqs4096"
    two = target(fp8="fp8")
    planned, _ = evaluate(Candidate(max_num_seqs=64, quantization="none"), two)  # type: ignore
    assert planned.name == "seqs64-qnone"
    # The plan names them the same way (the grid holds "none" as the one variant).
    names = [
        c.name
        for c in plan(Space({"max_num_seqs": (64,), "quantization": ("none",)}), one).candidates
    ]
    assert names == ["seqs64"]


@pytest.mark.parametrize(
    ("seqs", "fits", "expected"),
    [(64, 10.7, 10), (8, 100.0, 8), (64, 0.3, 1), (64, 0.0, 1), (16, 16.0, 16), (4, math.inf, 4)],
)
def test_feasible_concurrency(seqs: int, fits: float, expected: int) -> None:
    assert feasible_concurrency(seqs, fits) == expected


def test_capped_candidates_use_the_feasible_concurrency() -> None:
    t = target("a100-40gb", context=8192)
    planned, cap = evaluate(Candidate(max_num_seqs=64), t)  # type: ignore[misc]
    assert cap is not None
    assert planned.candidate.max_num_seqs == feasible_concurrency(64, planned.max_concurrency)


def test_serving_values_fixed_then_candidate_then_variant() -> None:
    spec = load_model("llama-3.1-8b")
    fp8 = Variant("fp8", "org/m", spec, flag="fp8", source="online")
    fixed = {"model": "ignored", "max_model_len": 512, "max_num_seqs": 4, "quantization": "awq"}
    cand = Candidate(max_num_seqs=8, quantization="fp8")
    values = serving_values(fixed, cand, fp8)
    assert values == {
        "model": "org/m",
        "max_model_len": 512,
        "max_num_seqs": 8,
        "quantization": "fp8",
    }
    assert next(iter(values)) == "model"
    none = Variant("none", "org/m", spec)
    assert "quantization" not in serving_values({}, Candidate(quantization="none"), none)


def test_empty_plan_names_the_rule() -> None:
    t = target("l4", model="llama-3.1-70b")
    with pytest.raises(ParameterError, match=r"every candidate was pruned.*does-not-fit"):
        plan(Space({"max_num_seqs": (8, 16)}), t)


def test_default_spaces() -> None:
    gpu_space = default_space(target("h100", fp8="fp8"))
    assert "kv_cache_dtype" in gpu_space.values
    assert gpu_space.values["quantization"] == ("none", "fp8")
    a100 = default_space(target("a100-80gb"))
    assert "kv_cache_dtype" not in a100.values
    cpu = default_space(target("cpu", model="qwen2.5-0.5b", max_model_len=2048))
    assert len(cpu.values["max_num_seqs"]) >= 3
