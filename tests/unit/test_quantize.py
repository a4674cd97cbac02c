"""vtune quantize without the real tools: calibration, checks, backend errors, cache, CLI errors.

The real AutoAWQ / GPTQ runs are in tests/e2e/test_quantize_e2e.py; here a fake backend writes
a checkpoint, so the orchestration (marker, reuse, the locked swap of the output, recovery after
a kill) is tested in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from tuner.errors import DatasetError, ModelError, ParameterError, UnsupportedError
from tuner.plan.prune import Variant
from tuner.plan.variants import default_variant_dir
from tuner.quant import outdir
from tuner.quant import quantize as quantize_module
from tuner.quant.quality import (
    assess,
    dequantize_awq,
    dequantize_gptq,
    perplexity,
    quality_loss_pct,
)
from tuner.quant.quantize import (
    MARKER,
    QuantizeRequest,
    QuantJob,
    calibration_blocks,
    check_method_on_gpu,
    check_request,
    get_backend,
    load_calibration_texts,
    quantize,
)
from tuner.quant.variants import materialize
from tuner.specs.gpu import get_gpu
from tuner.specs.model import load_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 300,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}


def write_config(directory: Path, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**CONFIG, **extra}))
    return directory


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A config plus a byte-level tokenizer (no weights: the fake backend never reads them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = write_config(tmp_path / "base")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1} | {ch: i + 2 for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    return directory


class FakeBackend:
    """Writes a small AWQ-looking checkpoint and counts its calls."""

    name: ClassVar[str] = "fake"
    method: ClassVar[str] = "awq"
    modules: ClassVar[tuple[str, ...]] = ("json",)
    install: ClassVar[str] = "nothing"

    def __init__(self) -> None:
        self.jobs: list[QuantJob] = []

    def quantize(self, job: QuantJob) -> None:
        import torch
        from safetensors.torch import save_file

        self.jobs.append(job)
        save_file(
            {"w.qweight": torch.zeros(8, 4, dtype=torch.int32)}, job.out_dir / "x.safetensors"
        )
        qc = {"quant_method": "awq", "bits": job.bits, "group_size": job.group_size}
        (job.out_dir / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": qc}))


# -- calibration -----------------------------------------------------------------------------


def test_bundled_calibration_set_is_a_few_dozen_varied_paragraphs() -> None:
    texts = load_calibration_texts()
    assert 30 <= len(texts) <= 60
    assert len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 20 for t in texts)
    assert any("def " in t for t in texts) and any("SELECT" in t for t in texts)


def test_calibration_formats(tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\nstill first\n\n  \n\nsecond\n\n\n")
    assert load_calibration_texts(txt) == ["first paragraph\nstill first", "second"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a b"}\n\n{"text": "c"}\n')
    assert load_calibration_texts(jsonl) == ["a b", "c"]
    js = tmp_path / "c.json"
    js.write_text('["x", " ", "y"]')
    assert load_calibration_texts(js) == ["x", "y"]


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.txt", "", "empty"),
        ("blank.txt", "\n  \n\n\t\n", "empty"),
        ("bad.jsonl", '{"text": "a"}\n{oops\n', "not valid JSON"),
        ("num.jsonl", '{"text": 3}\n', "'text' field"),
        ("dict.json", '{"text": "a"}', "list of texts"),
        ("empty.json", "[]", "empty"),
    ],
)
def test_bad_calibration_files(tmp_path: Path, name: str, content: str, needle: str) -> None:
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(DatasetError, match=needle):
        load_calibration_texts(file)


def test_missing_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read calibration file"):
        load_calibration_texts(tmp_path / "nope.txt")


def test_calibration_blocks_are_equal_slices_of_the_token_stream() -> None:
    lists = [list(range(0, 50)), list(range(50, 130))]
    blocks = calibration_blocks(lists, seq_len=40, max_blocks=10)
    assert [len(b) for b in blocks] == [40, 40, 40]
    assert blocks[1] == list(range(40, 80))
    assert len(calibration_blocks(lists, seq_len=40, max_blocks=2)) == 2
    short = calibration_blocks([list(range(40))], seq_len=512, max_blocks=8)
    assert short == [list(range(40))]  # shorter texts: one block of what there is
    with pytest.raises(DatasetError, match="too small"):
        calibration_blocks([[1, 2, 3]], seq_len=512, max_blocks=8)


# -- checks ----------------------------------------------------------------------------------


def request(model: Path | str, out: Path | str, **kw: object) -> QuantizeRequest:
    return QuantizeRequest(model=str(model), method=kw.pop("method", "awq"), out_dir=str(out), **kw)


def test_already_quantized_model_is_rejected(tmp_path: Path) -> None:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    directory = write_config(tmp_path / "q", quantization_config=qc)
    spec = load_model(str(directory))
    with pytest.raises(ModelError, match=r"already quantized \(gptq, 4-bit\)"):
        check_request(request(directory, tmp_path / "o"), spec)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"group_size": 128}, "does not divide"),  # 64 and 192 input rows
        ({"group_size": 0}, "positive even"),
        ({"group_size": 33}, "positive even"),
        ({"bits": 3}, "builds 4-bit"),
        ({"method": "gptq", "bits": 3}, "2, 4, 8-bit"),
        ({"method": "fp8"}, "unknown method"),
        ({"calib_seq_len": 0}, "must be positive"),
    ],
)
def test_impossible_requests(tmp_path: Path, kw: dict, needle: str) -> None:
    directory = write_config(tmp_path / "m")
    with pytest.raises(ParameterError, match=needle):
        check_request(request(directory, tmp_path / "o", **kw), load_model(str(directory)))


def test_valid_group_sizes_pass(tmp_path: Path) -> None:
    directory = write_config(tmp_path / "m")
    spec = load_model(str(directory))
    check_request(request(directory, tmp_path / "o", group_size=64), spec)
    check_request(request(directory, tmp_path / "o", method="gptq", group_size=-1), spec)


def test_missing_backend_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuner.quant.backends._module_available", lambda name: name != "gptqmodel")
    with pytest.raises(UnsupportedError) as exc:
        get_backend("gptq")
    message = str(exc.value)
    assert "module 'gptqmodel' is not installed" in message
    assert "pip install" in message and "\n" not in message
    monkeypatch.setattr("tuner.quant.backends._module_available", lambda name: name != "awq")
    with pytest.raises(UnsupportedError, match="pip install autoawq"):
        get_backend("awq")


def test_method_unsupported_on_gpu() -> None:
    gpu = dataclasses.replace(get_gpu("a100-40gb"), quantization_methods=("gptq",))
    with pytest.raises(UnsupportedError, match="awq does not run on a100-40gb"):
        check_method_on_gpu("awq", gpu)
    check_method_on_gpu("gptq", gpu)


def test_default_variant_dir() -> None:
    path = default_variant_dir("/v", "/models/Tiny Llama/", "awq", 4, 128)
    assert path == Path("/v/Tiny-Llama-awq-w4g128")
    assert default_variant_dir("/v", "org/model", "gptq", 4, -1).name == "model-gptq-w4g-1"


# -- orchestration with a fake backend ------------------------------------------------------


def test_quantize_writes_marker_and_reuses(model_dir: Path, tmp_path: Path) -> None:
    fake = FakeBackend()
    out = tmp_path / "out"
    req = request(model_dir, out, group_size=64, calib_seq_len=64, max_calib_blocks=3)
    first = quantize(req, backend=fake)
    assert len(fake.jobs) == 1 and not first.reused
    job = fake.jobs[0]
    assert job.group_size == 64 and len(job.blocks) == 3 and job.seq_len == 64
    assert first.tensor_bytes == 8 * 4 * 4 and first.calib_blocks == 3
    assert (out / MARKER).is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))

    again = quantize(req, backend=fake)
    assert len(fake.jobs) == 1 and again.reused
    assert dataclasses.replace(again, reused=False) == first

    calib = tmp_path / "calib.txt"
    calib.write_text("another text entirely, long enough to make a few blocks. " * 20)
    rebuilt = quantize(dataclasses.replace(req, calib=str(calib)), backend=fake)
    assert len(fake.jobs) == 2 and not rebuilt.reused


def test_quantize_refuses_foreign_output_dir(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ParameterError, match="not written by vtune quantize"):
        quantize(request(model_dir, out, group_size=64), backend=FakeBackend())
    assert (out / "notes.txt").read_text() == "keep me"


def test_quantize_checks_gpu_before_anything(tmp_path: Path) -> None:
    gpu = dataclasses.replace(get_gpu("h100"), quantization_methods=("fp8",))
    with pytest.raises(UnsupportedError, match="does not run on h100"):
        quantize(request(tmp_path / "absent", tmp_path / "o"), gpu=gpu)


class SlowBackend(FakeBackend):
    """A fake build that holds on until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.go = threading.Event()

    def quantize(self, job: QuantJob) -> None:
        self.started.set()
        assert self.go.wait(10)
        super().quantize(job)


def marker_calib(out: Path) -> str:
    return json.loads((out / MARKER).read_text())["fingerprint"]["calib_sha256"]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_rebuild_swaps_new_in_and_leaves_nothing_behind(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "variants" / "m-awq"
    req = request(model_dir, out, group_size=64, calib_seq_len=64, max_calib_blocks=3)
    quantize(req, backend=FakeBackend())
    old_calib = marker_calib(out)
    calib = tmp_path / "calib.txt"
    calib.write_text("another text entirely, long enough to make a few blocks. " * 20)
    rebuilt = quantize(dataclasses.replace(req, calib=str(calib)), backend=FakeBackend())
    assert not rebuilt.reused and marker_calib(out) != old_calib
    assert leftovers(out.parent) == []
    assert (out.parent / ".m-awq.lock").is_file()  # the lock stays: removing it would race


def test_failed_second_rename_puts_the_old_checkpoint_back(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    req = request(model_dir, out, group_size=64, calib_seq_len=64, max_calib_blocks=3)
    quantize(req, backend=FakeBackend())
    old_calib = marker_calib(out)
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        if not Path(src).is_dir():  # the marker's own atomic write
            return real_replace(src, dst)
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old aside went fine; the new one cannot go in
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    calib = tmp_path / "calib.txt"
    calib.write_text("another text entirely, long enough to make a few blocks. " * 20)
    with pytest.raises(OSError, match="No space"):
        quantize(dataclasses.replace(req, calib=str(calib)), backend=FakeBackend())
    assert calls[0][0] == "out" and calls[0][1].startswith(".out.old-")
    assert calls[1][0].startswith(".out.tmp-") and calls[1][1] == "out"
    assert marker_calib(out) == old_calib  # the old checkpoint is back, complete
    assert quantize(req, backend=FakeBackend()).reused
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("finished", [True, False])
def test_kill_between_the_renames_is_recovered_by_the_next_build(
    model_dir: Path, tmp_path: Path, finished: bool
) -> None:
    """A real kill: the child process is SIGKILLed inside the swap (no rollback, no cleanup)."""
    out = tmp_path / "out"
    req = request(model_dir, out, group_size=64, calib_seq_len=64, max_calib_blocks=3)
    quantize(req, backend=FakeBackend())
    old_calib = marker_calib(out)
    calib = tmp_path / "calib.txt"
    calib.write_text("another text entirely, long enough to make a few blocks. " * 20)
    new_req = dataclasses.replace(req, calib=str(calib))
    pid = os.fork()
    if pid == 0:  # the build that is killed
        real_replace, calls = os.replace, []

        def killed(src, dst):
            if not Path(src).is_dir():  # the marker's own atomic write
                return real_replace(src, dst)
            calls.append(src)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # between "old aside" and "new in"
            return real_replace(src, dst)

        os.replace = killed  # the child only; it never returns
        if not finished:  # killed earlier: the new build has no marker yet
            quantize_module.atomic_write_json = lambda *a, **k: None
        try:
            quantize(new_req, backend=FakeBackend())
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert not out.exists() and len(leftovers(tmp_path)) == 2  # the moment after the kill

    again = quantize(new_req if finished else req, backend=FakeBackend())
    assert again.reused  # a complete checkpoint is back at the path and is used as it is
    assert marker_calib(out) != old_calib if finished else marker_calib(out) == old_calib
    assert leftovers(tmp_path) == []


def test_leftovers_of_dead_builds_are_removed_live_ones_kept(
    model_dir: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "variants"
    for name in (".m-awq.tmp-1-0badcafe", ".m-awq.old-424242-00ff", ".m-awq.tmp-77"):
        (parent / name).mkdir(parents=True)  # pid 1 "lives" in every container: not a test
        (parent / name / "model.safetensors").write_bytes(b"x" * 1000)
    (parent / ".m-gptq.lock").touch()  # a sibling target vtune built before, killed mid-build
    (parent / ".m-gptq.tmp-5-ab").mkdir()
    (parent / ".m-fp8.lock").touch()  # a sibling being built right now: its lock is held
    (parent / ".m-fp8.tmp-6-cd").mkdir()
    (parent / ".tool.tmp-7").mkdir()  # another tool's look-alike, no vtune lock: untouched
    with outdir._flock(outdir.lock_path(parent / "m-fp8"), wait=False) as held:
        assert held
        quantize(request(model_dir, parent / "m-awq", group_size=64), backend=FakeBackend())
    assert leftovers(parent) == [".m-fp8.tmp-6-cd", ".tool.tmp-7"]


def test_second_build_into_the_same_target_waits_then_reuses(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    req = request(model_dir, out, group_size=64, calib_seq_len=64, max_calib_blocks=3)
    first, second = SlowBackend(), FakeBackend()
    results: dict[str, object] = {}
    t1 = threading.Thread(target=lambda: results.setdefault("1", quantize(req, backend=first)))
    t1.start()
    assert first.started.wait(10)
    t2 = threading.Thread(target=lambda: results.setdefault("2", quantize(req, backend=second)))
    t2.start()
    time.sleep(0.5)
    assert t2.is_alive() and not second.jobs  # waiting on the lock, not building alongside
    first.go.set()
    t1.join(10)
    t2.join(10)
    assert not second.jobs and results["2"].reused and not results["1"].reused
    assert leftovers(tmp_path) == []


def test_quality_guard_without_tokenizer_is_one_line(tmp_path: Path) -> None:
    base = write_config(tmp_path / "no-tokenizer")  # config and (no) weights, no tokenizer
    spec = load_model(str(base))
    variants = {
        "none": Variant("none", str(base), spec),
        "fp8": Variant("fp8", str(base), spec, flag="fp8", source="online"),
    }
    with pytest.raises(ModelError) as exc:
        materialize(variants, get_gpu("h100"), max_quality_loss=3.0)
    message = str(exc.value)
    assert "\n" not in message and "--max-quality-loss" in message and str(base) in message


def test_perplexity_without_tokenizer_is_one_line(tmp_path: Path) -> None:
    base = write_config(tmp_path / "no-tokenizer")
    with pytest.raises(ModelError) as exc:
        perplexity(base, ["some text to score"])
    assert "\n" not in str(exc.value) and "tokenizer" in str(exc.value)


# -- quality arithmetic and unpacking --------------------------------------------------------


def test_quality_loss_and_assess() -> None:
    assert quality_loss_pct(10.0, 10.5) == pytest.approx(5.0)
    assert quality_loss_pct(10.0, 9.0) == pytest.approx(-10.0)
    assert assess("awq", 10.0, 10.2, 3.0).passed
    result = assess("gptq", 10.0, 10.5, 3.0)
    assert not result.passed and result.loss_pct == pytest.approx(5.0)
    assert result.to_json()["variant"] == "gptq"
    assert assess("x", 10.0, 99.0, None).passed
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ParameterError):
            quality_loss_pct(bad, 10.0)


def _pack(values, order):
    """Pack 8 4-bit values per int32 (value order[i] into nibble i) as a signed int32."""
    word = 0
    for nibble, index in enumerate(order):
        word |= values[index] << (4 * nibble)
    return word - (1 << 32) if word >= 1 << 31 else word


def test_awq_unpacking_order_and_formula() -> None:
    import torch

    awq_order = (0, 2, 4, 6, 1, 3, 5, 7)
    q = [[(r * 8 + c) % 16 for c in range(8)] for r in range(4)]  # 4 input rows, 8 outputs
    qweight = torch.tensor([[_pack(row, awq_order)] for row in q], dtype=torch.int32)
    qzeros = torch.tensor([[_pack([8] * 8, awq_order)], [_pack([3] * 8, awq_order)]])
    scales = torch.tensor([[0.5] * 8, [2.0] * 8], dtype=torch.float16)
    w = dequantize_awq(qweight, qzeros.to(torch.int32), scales, 4)  # group size 2
    expected = torch.tensor(
        [
            [(q[r][c] - (8 if r < 2 else 3)) * (0.5 if r < 2 else 2.0) for c in range(8)]
            for r in range(4)
        ]
    )
    assert torch.equal(w, expected)


def test_gptq_unpacking_and_zero_offset() -> None:
    import torch

    q = [[(r + 3 * c) % 16 for c in range(8)] for r in range(8)]  # 8 input rows, 8 outputs
    seq = tuple(range(8))
    qweight = torch.tensor([[_pack([q[r][c] for r in range(8)], seq) for c in range(8)]])
    qzeros = torch.tensor([[_pack([7] * 8, seq)]], dtype=torch.int32)  # v1 stores zero - 1
    scales = torch.full((1, 8), 0.25, dtype=torch.float16)
    g_idx = torch.zeros(8, dtype=torch.int32)
    w = dequantize_gptq(qweight.to(torch.int32), qzeros, scales, 4, g_idx)
    expected = torch.tensor([[(q[r][c] - 8) * 0.25 for c in range(8)] for r in range(8)])
    assert torch.equal(w, expected)
    v2 = dequantize_gptq(qweight.to(torch.int32), qzeros, scales, 4, g_idx, zero_offset=0)
    assert torch.equal(v2, expected + 0.25)  # v2 stores the zero itself (7 here)


# -- CLI: bad input is one line and exit code 2 ----------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from tuner.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["quantize", *args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vtune: error:") and needle in lines[0], lines[0]


def test_cli_empty_calibration(capsys, tmp_path: Path) -> None:
    model = write_config(tmp_path / "m")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(
        capsys,
        "--model",
        str(model),
        "--method",
        "awq",
        "--out",
        str(tmp_path / "o"),
        "--group-size",
        "64",
        "--calib",
        str(empty),
    )
    assert_one_line_error(code, err, "is empty")


def test_cli_already_quantized(capsys, tmp_path: Path) -> None:
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True}
    model = write_config(tmp_path / "m", quantization_config=qc)
    code, _, err = run_cli(
        capsys,
        "--model",
        str(model),
        "--method",
        "gptq",
        "--out",
        str(tmp_path / "o"),
        "--group-size",
        "64",
    )
    assert_one_line_error(code, err, "already quantized (awq, 4-bit)")


def test_cli_missing_backend(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("tuner.quant.backends._module_available", lambda name: False)
    model = write_config(tmp_path / "m")
    code, _, err = run_cli(
        capsys,
        "--model",
        str(model),
        "--method",
        "gptq",
        "--out",
        str(tmp_path / "o"),
        "--group-size",
        "64",
    )
    assert_one_line_error(code, err, "gptq quantization needs optimum-gptq")


def test_cli_method_unsupported_on_gpu(capsys, monkeypatch, tmp_path: Path) -> None:
    no_awq = dataclasses.replace(get_gpu("a10g"), quantization_methods=("gptq", "fp8"))
    monkeypatch.setattr("tuner.specs.gpu.get_gpu", lambda name: no_awq)
    code, _, err = run_cli(
        capsys,
        "--model",
        str(write_config(tmp_path / "m")),
        "--method",
        "awq",
        "--out",
        str(tmp_path / "o"),
        "--gpu",
        "a10g",
    )
    assert_one_line_error(code, err, "awq does not run on a10g")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "fp8"], "'fp8' is not one of"),
        (["--method", "awq", "--bits", "0"], "must be a positive integer"),
        (["--method", "awq", "--gpu", "no-such-gpu"], "no-such-gpu"),
        (["--method", "awq", "--group-size", "128"], "does not divide"),
    ],
)
def test_cli_bad_options(capsys, tmp_path: Path, args: list[str], needle: str) -> None:
    model = write_config(tmp_path / "m")
    code, _, err = run_cli(capsys, "--model", str(model), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, needle)


def test_cli_missing_model(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys, "--model", str(tmp_path / "nope"), "--method", "awq", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "does not exist")
