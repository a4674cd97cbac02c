"""Default spaces and pruning with the analytic bounds, each decision with its reason.

Rules (names appear in the plan and the JSON record):

- ``unsupported``: the quantization variant or KV dtype does not run on this GPU.
- ``invalid``: vLLM would reject the combination (e.g. max_num_batched_tokens < max_num_seqs).
- ``no-chunked-prefill``: max_num_batched_tokens below max_model_len without chunked prefill.
- ``does-not-fit``: the weights leave no KV pool, or it cannot hold one max_model_len sequence
  (vLLM refuses to start).
- ``dominated``: max_num_seqs far past both the KV-feasible concurrency and the roofline knee.
- ``kv-capacity``: max_num_seqs x the workload's context exceeds the KV capacity: capped to what
  fits, or dropped when the capped candidate repeats another.
- ``same-as-defaults``: every knob equals what vLLM uses when it is left unset
  (``tuner.specs.vllm_defaults``, the table the estimator reads too), so the baseline trial
  already measures it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from tuner.analytic.estimate import ServingConfig, estimate
from tuner.errors import ParameterError, UnsupportedError
from tuner.plan.space import Candidate, Space
from tuner.specs.gpu import GpuSpec
from tuner.specs.model import ModelSpec
from tuner.specs.vllm_defaults import vllm_defaults

RULE_UNSUPPORTED = "unsupported"
RULE_INVALID = "invalid"
RULE_NO_CHUNKED = "no-chunked-prefill"
RULE_NO_FIT = "does-not-fit"
RULE_DOMINATED = "dominated"
RULE_KV = "kv-capacity"
RULE_DEFAULTS = "same-as-defaults"
# max_num_seqs beyond this multiple of max(KV-feasible concurrency, knee) cannot pay off.
DOMINANCE_FACTOR = 4.0


@dataclass(frozen=True)
class Variant:
    """A model variant the search can serve: the original, an online method, or a checkpoint.

    ``flag`` is vLLM's ``--quantization`` value (None: unquantized, or detected from the
    checkpoint's own config, which vLLM does itself)."""

    name: str
    model: str
    spec: ModelSpec = field(repr=False, compare=False)
    flag: str | None = None
    source: str = "original"  # original | online | checkpoint | built
    quality: dict[str, float] | None = None  # perplexity figures when the guard ran


@dataclass(frozen=True)
class Target:
    """What pruning is measured against: model variants, GPU, the workload's context length."""

    gpu: GpuSpec
    variants: dict[str, Variant]
    context_len: int  # input + output tokens of the workload's typical request
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None


@dataclass(frozen=True)
class Planned:
    """A surviving candidate with the estimates that ranked it."""

    candidate: Candidate
    predicted_tokens_per_s: float
    kv_capacity_tokens: int
    max_concurrency: float
    roofline_knee_batch: float | None
    weight_bytes: int
    origin: Candidate | None = None  # the uncapped candidate, when capping changed it

    @property
    def name(self) -> str:
        return self.candidate.name

    def estimate_json(self) -> dict[str, float | int | None]:
        return {
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_concurrency": self.max_concurrency,
            "roofline_knee_batch": self.roofline_knee_batch,
            "weight_bytes": self.weight_bytes,
        }


@dataclass(frozen=True)
class Pruned:
    candidate: Candidate
    rule: str
    reason: str


@dataclass(frozen=True)
class Capped:
    original: Candidate
    capped: Candidate
    reason: str


@dataclass(frozen=True)
class Plan:
    """The pruned, ordered search: baseline first, then the analytically best candidates."""

    baseline: Planned
    candidates: tuple[Planned, ...]
    pruned: tuple[Pruned, ...]
    capped: tuple[Capped, ...]
    space_size: int

    def counts_by_rule(self) -> dict[str, int]:
        return dict(Counter(p.rule for p in self.pruned))

    def all(self) -> list[Planned]:
        return [self.baseline, *self.candidates]

    def first_picks(self, n: int) -> list[Planned]:
        """The baseline and ``n`` analytically best candidates whose predictions differ.

        Candidates the estimator cannot tell apart (e.g. one max_num_seqs with several
        max_num_batched_tokens) are ties: measuring several of them first spends the budget
        on one point of the model's ranking, so ties wait for the sampler (or fill up when
        there are fewer than ``n`` distinct predictions)."""
        distinct: list[Planned] = []
        ties: list[Planned] = []
        seen: set[float] = set()
        for planned in self.candidates:
            key = float(f"{planned.predicted_tokens_per_s:.3g}")
            (ties if key in seen else distinct).append(planned)
            seen.add(key)
        return [self.baseline, *(distinct + ties)[:n]]


def default_space(target: Target, *, shared_prefix: bool = False) -> Space:
    """vtune's default space for this GPU and model: ladders of max_num_seqs and
    max_num_batched_tokens, memory utilization, KV dtype where supported, chunked prefill,
    prefix caching when the workload shares prefixes, and the quantization variants."""
    gpu = target.gpu
    variants = tuple(target.variants)
    if gpu.is_cpu:
        # vLLM CPU: a small ladder keeps each demo/CI search to a few launches.
        return Space({"max_num_seqs": (16, 64, 256), "quantization": variants})
    values: dict[str, tuple] = {
        "max_num_seqs": (16, 32, 64, 128, 256, 512, 1024),
        "max_num_batched_tokens": (2048, 4096, 8192, 16384),
        "gpu_memory_utilization": (0.90, 0.95),
        "enable_chunked_prefill": (True, False),
        "quantization": variants,
    }
    if gpu.supports_kv_cache_dtype("fp8"):
        values["kv_cache_dtype"] = ("auto", "fp8")
    if shared_prefix:
        values["enable_prefix_caching"] = (True, False)
    return Space(values)


def plan(space: Space, target: Target, *, max_candidates: int = 5000) -> Plan:
    """Enumerate the space, prune and cap with the estimator, and order the survivors by
    predicted decode throughput (best first). Raises ParameterError naming the rules that
    emptied the space."""
    if space.size() > max_candidates:
        raise ParameterError(
            f"the space has {space.size()} combinations (limit "
            f"{max_candidates}); narrow it with --param or --space"
        )
    kept: dict[str, Planned] = {}
    pruned: list[Pruned] = []
    capped: list[Capped] = []
    for cand in space.candidates():
        outcome = evaluate(cand, target)
        if isinstance(outcome, Pruned):
            pruned.append(outcome)
            continue
        planned, cap = outcome
        if planned.name in kept:
            if cap is not None:
                repeat = f"{cap.reason}: same as {planned.name}"
                pruned.append(Pruned(cap.original, RULE_KV, repeat))
            continue
        if cap is not None:
            capped.append(cap)
        kept[planned.name] = planned

    baseline_outcome = evaluate(Candidate(), target, baseline=True)
    assert not isinstance(baseline_outcome, Pruned)
    baseline = baseline_outcome[0]
    kept.pop(baseline.name, None)
    if not kept:
        counts = Counter(p.rule for p in pruned)
        detail = ", ".join(f"{n} by {rule}" for rule, n in counts.most_common())
        example = pruned[0].reason if pruned else "no candidates"
        raise ParameterError(f"every candidate was pruned ({detail}); e.g. {example}")
    ordered = sorted(kept.values(), key=lambda p: (-p.predicted_tokens_per_s, p.name))
    return Plan(baseline, tuple(ordered), tuple(pruned), tuple(capped), space.size())


def normalize(cand: Candidate, target: Target) -> Candidate:
    """``cand`` as the search names it: with a single variant (the original model) there is no
    quantization to vary, so ``quantization="none"`` is left unset (``seqs64``, not
    ``seqs64-qnone``)."""
    if cand.quantization == "none" and len(target.variants) == 1:
        return cand.with_knob("quantization", None)
    return cand


def feasible_concurrency(seqs: int, max_concurrency: float) -> int:
    """``seqs`` (a max_num_seqs) capped to the sequences the KV cache holds at the workload's
    context (``max_concurrency``, the estimate's): at least 1. The cap on candidates, the batch
    the estimate is read at and the load every trial's capacity probe starts from."""
    if not math.isfinite(max_concurrency):
        return max(1, seqs)
    return max(1, min(seqs, math.floor(max_concurrency)))


def same_as_defaults(cand: Candidate, target: Target) -> Pruned | None:
    """The ``same-as-defaults`` decision for a (non-baseline) candidate, None when it differs."""
    if effective_knobs(cand, target) != effective_knobs(Candidate(), target):
        return None
    knobs = ", ".join(f"{k}={v}" for k, v in cand.knobs().items())
    reason = f"{knobs}: vLLM's defaults on {target.gpu.name}, measured by the baseline"
    return Pruned(cand, RULE_DEFAULTS, reason)


def effective_knobs(cand: Candidate, target: Target) -> dict[str, object] | None:
    """The knobs vLLM will run ``cand`` with (its own values over vLLM's defaults); None when
    it sets a knob whose default vtune does not model, so it is never taken for the defaults."""
    knobs = cand.knobs()
    defaults = vllm_defaults()
    tp = knobs.get("tensor_parallel_size") or defaults.tensor_parallel_size
    unset = defaults.knob_values(target.gpu, tp)
    if set(knobs) - set(unset):
        return None
    values: dict[str, object] = {**unset, **knobs}
    values["quantization"] = values["quantization"] or "none"  # vLLM's none: the original model
    if values["enable_chunked_prefill"] is False and "max_num_batched_tokens" not in knobs:
        del values["max_num_batched_tokens"]  # vLLM's budget then follows max_model_len
    return values


def evaluate(
    cand: Candidate, target: Target, *, baseline: bool = False
) -> Pruned | tuple[Planned, Capped | None]:
    """Apply the rules to one candidate, :func:`normalize` first. The baseline (vLLM
    defaults) is never pruned. Unset knobs take vLLM's defaults (``tuner.specs.vllm_defaults``),
    the ones ``same-as-defaults`` compares with."""
    cand = normalize(cand, target)
    gpu = target.gpu
    defaults = vllm_defaults()
    variant = target.variants.get(cand.quantization or "none")
    if variant is None:
        return Pruned(cand, RULE_INVALID, f"unknown quantization variant {cand.quantization!r}")
    if variant.flag and not gpu.supports_quantization(variant.flag):
        return Pruned(
            cand, RULE_UNSUPPORTED, f"--quantization {variant.flag} does not run on {gpu.name}"
        )
    kv_dtype = cand.kv_cache_dtype or defaults.kv_cache_dtype
    if not gpu.supports_kv_cache_dtype(kv_dtype):
        return Pruned(
            cand, RULE_UNSUPPORTED, f"--kv-cache-dtype {kv_dtype} does not run on {gpu.name}"
        )
    spec = variant.spec
    tp = cand.tensor_parallel_size or defaults.tensor_parallel_size
    max_model_len = min(
        cand.max_model_len or target.max_model_len or spec.max_position_embeddings,
        spec.max_position_embeddings,
    )
    default_mbt, default_seqs = defaults.batch_limits(gpu, tp)
    seqs = cand.max_num_seqs or default_seqs
    mbt = cand.max_num_batched_tokens
    if mbt is None:
        # vLLM raises its default to max_model_len when chunked prefill is off.
        mbt = (
            default_mbt
            if cand.enable_chunked_prefill is not False
            else max(default_mbt, max_model_len)
        )
    elif cand.enable_chunked_prefill is False and mbt < max_model_len and not baseline:
        return Pruned(
            cand,
            RULE_NO_CHUNKED,
            f"max_num_batched_tokens {mbt} < max_model_len {max_model_len} without chunked prefill",
        )
    if mbt < seqs and not baseline:
        return Pruned(
            cand,
            RULE_INVALID,
            f"max_num_batched_tokens {mbt} < max_num_seqs {seqs} (vLLM rejects it)",
        )
    cfg = ServingConfig(
        max_model_len=max_model_len,
        context_len=min(target.context_len, max_model_len),
        quantization=variant.flag,
        kv_cache_dtype=kv_dtype,
        gpu_memory_utilization=cand.gpu_memory_utilization or defaults.gpu_memory_utilization,
        max_num_batched_tokens=mbt,
        max_num_seqs=seqs,
        block_size=cand.block_size,
        kv_cache_memory_bytes=target.kv_cache_memory_bytes,
        tensor_parallel_size=tp,
    )
    try:
        est = estimate(spec, gpu, cfg, ladder=())
    except UnsupportedError as exc:
        return Pruned(cand, RULE_UNSUPPORTED, str(exc))
    except ParameterError as exc:
        return Pruned(cand, RULE_INVALID, str(exc))
    if not baseline and est.kv_capacity_tokens < max_model_len:
        return Pruned(
            cand,
            RULE_NO_FIT,
            f"KV capacity {est.kv_capacity_tokens} tokens < "
            f"max_model_len {max_model_len} (pool "
            f"{est.kv_pool_bytes / 2**30:.2f} GiB)",
        )
    feasible = est.max_concurrency
    knee = est.roofline_knee_batch or 0.0
    if not baseline and seqs > DOMINANCE_FACTOR * max(feasible, knee, 1.0):
        return Pruned(
            cand,
            RULE_DOMINATED,
            f"max_num_seqs {seqs} > {DOMINANCE_FACTOR:g} x "
            f"max(KV-feasible {feasible:.0f}, knee {knee:.0f})",
        )
    cap = None
    origin = cand
    if not baseline and cand.max_num_seqs and seqs > feasible:
        fitting = feasible_concurrency(seqs, feasible)
        capped = cand.with_knob("max_num_seqs", fitting)
        cap = Capped(
            cand,
            capped,
            f"max_num_seqs {seqs} capped to {fitting} (KV holds "
            f"{feasible:.1f} sequences of {target.context_len} tokens)",
        )
        cand, seqs = capped, fitting
    same = None if baseline else same_as_defaults(cand, target)
    if same is not None:
        return same
    batch = feasible_concurrency(seqs, feasible)
    point = estimate(spec, gpu, cfg, ladder=(batch,)).ladder[0]
    return Planned(
        cand,
        point.tokens_per_s,
        est.kv_capacity_tokens,
        feasible,
        est.roofline_knee_batch,
        est.weight_bytes,
        origin,
    ), cap
