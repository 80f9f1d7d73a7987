"""The safetensors header reader: every structural fault is an AdapterFormatError with its own code."""

from __future__ import annotations

import json
import os
import pickle
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from safe_peft import AdapterFormatError, Cause
from safe_peft._files.safetensors_header import read_header


def _file(tmp_path: Any, header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> str:
    body = raw if raw is not None else json.dumps(header).encode()
    path = str(tmp_path / "adapter_model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape if shape is not None else [2, 2], "data_offsets": offsets or [0, 16]}


def test_reads_a_real_file(tmp_path: Any) -> None:
    path = str(tmp_path / "a.safetensors")
    save_file(
        {"a.lora_A.weight": torch.zeros(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16)},
        path,
        metadata={"format": "pt"},
    )
    header = read_header(path)
    assert {k: (t.dtype, t.shape) for k, t in header.tensors.items()} == {
        "a.lora_A.weight": ("F32", (4, 8)),
        "b": ("BF16", (3,)),
    }
    assert header.metadata == {"format": "pt"}
    assert header.total_bytes == 4 * 8 * 4 + 3 * 2


CASES = [
    ("truncated_file", dict(raw=b"", length=None, header=None, data=b""), "short"),
    ("truncated_file", dict(header={"t": _entry()}, data=b"\0" * 8), "data"),
    ("header_too_large", dict(header={}, length=200_000_000), None),
    ("truncated_file", dict(header={}, length=5000), None),
    ("bad_json", dict(header=None, raw=b"{not json"), None),
    ("bad_json", dict(header=None, raw=b"\xff\xfe"), None),
    ("bad_json", dict(header=[1, 2]), None),
    (
        "duplicate_header_key",
        dict(
            header=None,
            raw=b'{"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
            b'"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
        ),
        None,
    ),
    ("bad_dtype", dict(header={"t": _entry(dtype="F99")}, data=b"\0" * 16), None),
    ("bad_shape", dict(header={"t": _entry(shape=[-1, 2])}, data=b"\0" * 16), None),
    ("bad_shape", dict(header={"t": _entry(shape=[True, 2])}, data=b"\0" * 16), None),
    ("bad_offsets", dict(header={"t": _entry(offsets=[16, 0])}, data=b"\0" * 16), None),
    ("bad_offsets", dict(header={"t": _entry(offsets=[0, 12])}, data=b"\0" * 12), None),
    ("bad_offsets", dict(header={"a": _entry(), "b": _entry()}, data=b"\0" * 32), None),
    ("bad_offsets", dict(header={"a": _entry(offsets=[16, 32])}, data=b"\0" * 32), None),
    ("trailing_bytes", dict(header={"a": _entry()}, data=b"\0" * 20), None),
    ("bad_entry", dict(header={"a": {"dtype": "F32"}}), None),
    ("bad_metadata", dict(header={"__metadata__": {"k": 1}}), None),
    ("bad_offsets", dict(header={"t": _entry(shape=[10**30, 10**30])}, data=b"\0" * 16), None),
]


@pytest.mark.parametrize("code, spec, variant", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_corruption_battery(tmp_path: Any, code: str, spec: dict[str, Any], variant: str | None) -> None:
    if variant == "short":
        path = str(tmp_path / "adapter_model.safetensors")
        with open(path, "wb") as f:
            f.write(b"\x01\x02")
    else:
        path = _file(
            tmp_path, spec.get("header"), spec.get("data", b""), raw=spec.get("raw"), length=spec.get("length")
        )
    with pytest.raises(AdapterFormatError) as info:
        read_header(path)
    primary = info.value.report.primary
    assert primary is not None
    assert (primary.cause, primary.code) == (Cause.CORRUPT_CHECKPOINT, code)
    assert path in primary.message


@pytest.mark.parametrize("container", ["pickle", "zip"])
def test_pickle_or_zip_named_safetensors(tmp_path: Any, container: str) -> None:
    path = str(tmp_path / "adapter_model.safetensors")
    if container == "zip":
        torch.save({"a": torch.zeros(2)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"a": 1}, f, protocol=4)
    with pytest.raises(AdapterFormatError) as info:
        read_header(path)
    assert info.value.code == "not_safetensors"
    assert info.value.report.primary is not None
    assert info.value.report.primary.details["format"] == container


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])
def test_header_lengths_that_start_like_a_pickle_are_safetensors(tmp_path: Any, length: int) -> None:
    """A header of 640 bytes is ``80 02 00 ...``: the first bytes of a protocol-2 pickle. Still safetensors."""
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = {"x.lora_A.weight": torch.arange(8.0).reshape(2, 4)}
    for pad in range(length):  # find the metadata padding that gives exactly this header length
        save_file(tensors, path, metadata={"format": "pt", "pad": "p" * pad})
        with open(path, "rb") as f:
            if struct.unpack("<Q", f.read(8))[0] >= length:
                break
    with open(path, "rb") as f:
        prefix = f.read(8)
    assert struct.unpack("<Q", prefix)[0] == length
    assert prefix[0] == 0x80 and 2 <= prefix[1] <= 5
    header = read_header(path)
    assert list(header.tensors) == ["x.lora_A.weight"] and header.tensors["x.lora_A.weight"].shape == (2, 4)


@pytest.mark.property
@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_format_errors(tmp_path: Any, blob: bytes) -> None:
    import tracemalloc

    path = str(tmp_path / "random.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    tracemalloc.start()
    try:
        read_header(path)
    except AdapterFormatError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * len(blob) + 256 * 1024  # bounded by the file, never by what the header claims


@pytest.mark.property
@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 64))
def test_mutated_real_files_only_raise_format_errors(tmp_path: Any, position: int, value: int, cut: int) -> None:
    path = str(tmp_path / "mutated.safetensors")
    save_file({"x.lora_A.weight": torch.ones(4, 8), "x.lora_B.weight": torch.ones(8, 4)}, path)
    data = bytearray(_read(path))
    data[position % len(data)] = value
    with open(path, "wb") as f:
        f.write(bytes(data[: len(data) - cut]))
    try:
        header = read_header(path)
    except AdapterFormatError:
        return
    assert header.data_start + header.total_bytes == os.path.getsize(path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1_000_000,
        b'{"a":' * 200_000 + b"1" + b"}" * 200_000,
        b'"' + b"x" * 1_000_000 + b'"',
        json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20_000)}).encode(),
    ],
    ids=["deep_array", "deep_object", "long_string", "20k_entries"],
)
def test_megabyte_adversarial_headers_finish_quickly(tmp_path: Any, body: bytes) -> None:
    import time

    path = _file(tmp_path, None, raw=body)
    start = time.perf_counter()
    try:
        header = read_header(path)
        assert len(header.tensors) == 20_000
    except AdapterFormatError as exc:
        assert exc.code in {"bad_json", "bad_offsets"}
    assert time.perf_counter() - start < 5  # linear: a quadratic pass would take minutes


def test_claimed_header_length_is_never_allocated(tmp_path: Any) -> None:
    """A header claiming 90 MB in a 100-byte file is rejected before any allocation of that size."""
    import tracemalloc

    path = _file(tmp_path, None, raw=b"{}" + b" " * 90, length=90_000_000)
    tracemalloc.start()
    with pytest.raises(AdapterFormatError) as info:
        read_header(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info.value.code == "truncated_file"
    assert peak < 1024 * 1024
