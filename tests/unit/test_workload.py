"""Request sets: exact token counts, ranges, shared prefixes, ShareGPT files, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuner.errors import DatasetError, ModelError, ParameterError
from tuner.load.workload import (
    LengthRange,
    WorkloadSpec,
    build_requests,
    load_tokenizer,
    random_requests,
    read_sharegpt,
    sharegpt_requests,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def test_length_range_parse():
    assert LengthRange.parse("128") == LengthRange(128, 128)
    assert LengthRange.parse(" 64:256 ") == LengthRange(64, 256)
    assert LengthRange.parse("64-256") == LengthRange(64, 256)
    assert str(LengthRange(64, 256)) == "64:256" and str(LengthRange.fixed(5)) == "5"
    for bad in ("abc", "-5", "0", "10:5", "1.5"):
        with pytest.raises(ParameterError):
            LengthRange.parse(bad)


def test_random_prompts_have_exact_token_counts(tok: Any):
    reqs = random_requests(tok, 20, LengthRange(30, 90), LengthRange.fixed(16), seed=7)
    assert len(reqs) == 20
    special = set(tok.all_special_ids)
    for r in reqs:
        assert isinstance(r.prompt, tuple) and len(r.prompt) == r.prompt_len
        assert 30 <= r.prompt_len <= 90 and r.output_len == 16
        assert not special & set(r.prompt)  # no EOS/BOS inside a prompt
    assert len({r.prompt_len for r in reqs}) > 5  # a range really varies


def test_random_requests_are_reproducible(tok: Any):
    a = random_requests(tok, 5, LengthRange(10, 20), LengthRange(4, 8), seed=3)
    b = random_requests(tok, 5, LengthRange(10, 20), LengthRange(4, 8), seed=3)
    c = random_requests(tok, 5, LengthRange(10, 20), LengthRange(4, 8), seed=4)
    assert a == b and a != c


def test_shared_prefixes(tok: Any):
    reqs = random_requests(
        tok, 6, LengthRange.fixed(40), LengthRange.fixed(4), seed=1, prefix_len=24, num_prefixes=2
    )
    p0 = {r.prompt[:24] for r in reqs[0::2]}
    p1 = {r.prompt[:24] for r in reqs[1::2]}
    assert len(p0) == 1 and len(p1) == 1 and p0 != p1
    assert len({r.prompt[24:] for r in reqs}) == 6  # the rest differs
    assert all(len(r.prompt) == 40 for r in reqs)
    with pytest.raises(ParameterError):
        random_requests(tok, 2, LengthRange.fixed(10), LengthRange.fixed(4), prefix_len=10)


def test_chat_text_prompts_retokenize_to_the_length(tok: Any):
    reqs = random_requests(
        tok, 10, LengthRange(20, 60), LengthRange.fixed(8), seed=5, endpoint="chat"
    )
    for r in reqs:
        assert isinstance(r.prompt, str)
        assert len(tok.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
    assert sum(20 <= r.prompt_len <= 60 for r in reqs) == 10


def test_zero_prompts_is_a_parameter_error(tok: Any):
    with pytest.raises(ParameterError):
        random_requests(tok, 0, LengthRange.fixed(8), LengthRange.fixed(8))


def _sharegpt(path: Path, n: int = 5) -> Path:
    data = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"Tell me about the harbour and the boats number {i}."},
                {
                    "from": "gpt",
                    "value": "The fishermen checked their nets by lantern light " * (i + 1),
                },
            ],
        }
        for i in range(n)
    ]
    data.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}]})
    data.append("not a dict")
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_requests(tok: Any, tmp_path: Path):
    path = _sharegpt(tmp_path / "sg.json")
    assert len(read_sharegpt(path)) == 5
    reqs = sharegpt_requests(tok, path, 8, seed=1)
    assert len(reqs) == 8  # cycled
    for r in reqs:
        assert isinstance(r.prompt, tuple) and len(r.prompt) == r.prompt_len
        assert r.output_len >= 4
    assert reqs == sharegpt_requests(tok, path, 8, seed=1)
    fixed = sharegpt_requests(tok, path, 3, seed=1, output_len=LengthRange.fixed(7))
    assert {r.output_len for r in fixed} == {7}
    chat = sharegpt_requests(tok, path, 2, endpoint="chat")
    assert all(isinstance(r.prompt, str) and "harbour" in r.prompt for r in chat)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"conversations": []}]', "no entry"),
    ],
)
def test_bad_dataset_files(tok: Any, tmp_path: Path, content: str | None, fragment: str):
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError) as info:
        sharegpt_requests(tok, path, 3)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xfe[]", "is not UTF-8 text (byte 0)"),
        (b"[\n" + "«»".encode("latin-1") + b"]", "is not UTF-8 text (byte 2)"),
        (b"", "not valid JSON (Expecting value, line 1)"),
        (b"[1, 2,\n", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'"a string"', "expected a JSON list of conversations"),
        (b"null", "expected a JSON list of conversations"),
        (b"[[], 1, null, {}]", "no entry"),
        (b'[{"conversations": "hi"}, {"conversations": [{"value": 1}, {"value": 2}]}]', "no entry"),
    ],
)
def test_unreadable_sharegpt_is_one_dataset_error(tmp_path: Path, content: bytes, fragment: str):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read_sharegpt(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_sharegpt_path_that_is_a_directory_or_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with pytest.raises(DatasetError, match="is a directory, not a ShareGPT JSON file"):
        read_sharegpt(tmp_path)
    with pytest.raises(DatasetError, match="dataset file not found"):
        read_sharegpt(tmp_path / "missing.json")
    path = _sharegpt(tmp_path / "sg.json")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads any file: fake the refusal
    with pytest.raises(DatasetError) as info:
        read_sharegpt(path)
    assert str(info.value) == f"cannot read dataset {path}: Permission denied"


def test_sharegpt_with_a_byte_order_mark_is_read(tmp_path: Path):
    path = _sharegpt(tmp_path / "sg.json")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(read_sharegpt(path)) == 5


def test_dataset_with_nothing_that_fits(tok: Any, tmp_path: Path):
    path = _sharegpt(tmp_path / "sg.json")
    with pytest.raises(DatasetError, match="no conversation fits"):
        sharegpt_requests(tok, path, 3, max_input_len=3)


def test_missing_tokenizer_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError) as info:
        load_tokenizer(tmp_path / "nothing-here")
    assert "\n" not in str(info.value)


def test_workload_spec_builds_warmup_plus_measured(tok: Any, tmp_path: Path):
    spec = WorkloadSpec(
        num_prompts=5, input_len=LengthRange.fixed(12), output_len=LengthRange.fixed(3), seed=2
    )
    reqs = build_requests(tok, spec, extra=2)
    assert len(reqs) == 7 and all(r.prompt_len == 12 and r.output_len == 3 for r in reqs)
    assert spec.describe()["dataset"] == "random"
    data = WorkloadSpec(num_prompts=3, output_len=None, dataset=_sharegpt(tmp_path / "s.json"))
    assert len(build_requests(tok, data)) == 3
    with pytest.raises(ParameterError):
        WorkloadSpec(num_prompts=0)
    with pytest.raises(ParameterError):
        WorkloadSpec(output_len=None)
