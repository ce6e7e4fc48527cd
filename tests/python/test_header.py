"""load() refuses every malformed safetensors header the Rust validator refuses
(api/src/safetensors.rs), one rule per case, naming the tensor and the rule."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import modelwrapper


def t(name: str, dtype: str = "F32", shape: object = (1,), offsets: object = (0, 4)) -> str:
    return f'"{name}":{{"dtype":{json.dumps(dtype)},"shape":{json.dumps(list(shape) if isinstance(shape, tuple) else shape)},"data_offsets":{json.dumps(list(offsets) if isinstance(offsets, tuple) else offsets)}}}'


def image(header: str, data_len: int) -> bytes:
    """A file image: header JSON padded with spaces to 8 bytes, then data."""
    h = header.encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"\x01" * data_len


def volume(tmp_path: Path, weights: bytes) -> Path:
    """A hand-made one-component volume without a skeleton."""
    (tmp_path / "model.safetensors").write_bytes(weights)
    manifest = {
        "format": "zerocopy.dev/v1",
        "namespace": "default",
        "name": "h",
        "generation": "0123456789abcdef",
        "mode": "actor",
        "components": [{"name": "model", "weights": {"file": "model.safetensors", "bytes": len(weights), "sha256": "0" * 64}}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


CASES = [
    # (id, file bytes, expected message)
    ("too short", b"\x01\x00\x00\x00", r"file is 4 bytes: too short for a safetensors header"),
    ("header too large", struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{}", r"header length 104857601 exceeds the 104857600-byte limit"),
    ("header beyond file", struct.pack("<Q", 64) + b"{}", r"header length 64 does not fit in a 10-byte file: the file is truncated"),
    ("not json", image("not json", 0), r"header is not valid safetensors JSON"),
    ("nan", image('{"a":NaN}', 0), r"header is not valid safetensors JSON: NaN"),
    ("not an object", image("[1, 2]", 0), r"expected an object of tensors, found list"),
    ("metadata not a string map", image('{"__metadata__":{"a":1}}', 0), r"__metadata__ must map strings to strings"),
    ("metadata null", image('{"__metadata__":null}', 0), r"__metadata__ must map strings to strings"),
    ("duplicate key", image("{" + t("a") + "," + t("a") + "}", 4), r"key 'a' appears twice"),
    ("tensor not an object", image('{"a":[1]}', 0), r"tensor 'a' is a list, not an object of dtype, shape and data_offsets"),
    ("missing field", image('{"a":{"dtype":"F32","data_offsets":[0,4]}}', 4), r"tensor 'a' is missing shape"),
    ("unknown dtype", image("{" + t("a", dtype="Q7") + "}", 4), r"tensor 'a' has unsupported dtype 'Q7'"),
    ("dtype not a string", image("{" + t("a", dtype=4) + "}", 4), r"tensor 'a' has unsupported dtype 4"),
    ("negative dimension", image("{" + t("a", shape=(-1,)) + "}", 4), r"tensor 'a' has shape \[-1\]; dimensions must be non-negative integers"),
    ("non-integer dimension", image("{" + t("a", shape=(1.0,)) + "}", 4), r"tensor 'a' has shape \[1.0\]; dimensions must be"),
    ("boolean dimension", image("{" + t("a", shape=(True,)) + "}", 4), r"tensor 'a' has shape \[true\]; dimensions must be"),
    ("shape not a list", image("{" + t("a", shape="1") + "}", 4), r"tensor 'a' has shape \"1\""),
    ("negative offset", image("{" + t("a", offsets=(-4, 0)) + "}", 4), r"tensor 'a' has data_offsets \[-4, 0\]; expected \[begin, end\], non-negative integers"),
    ("non-integer offset", image("{" + t("a", offsets=("0", 4)) + "}", 4), r"tensor 'a' has data_offsets \[\"0\", 4\]"),
    ("three offsets", image("{" + t("a", offsets=(0, 4, 8)) + "}", 4), r"tensor 'a' has data_offsets \[0, 4, 8\]"),
    ("begin after end", image("{" + t("a", offsets=(4, 0)) + "}", 8), r"tensor 'a' has data_offsets \[4, 0\] with begin after end"),
    ("span does not match shape", image("{" + t("a", shape=(3,), offsets=(0, 8)) + "}", 8), r"tensor 'a': shape \[3\] of F32 needs 12 bytes but data_offsets span 8"),
    ("shape overflows", image("{" + t("a", shape=(2**62, 2**62), offsets=(0, 4)) + "}", 4), r"tensor 'a': shape .* overflows"),
    ("beyond the data", image("{" + t("a", shape=(2,), offsets=(0, 8)) + "}", 4), r"tensor 'a' ends at data byte 8 but the file holds 4 data bytes: the file is truncated"),
    ("overlap", image("{" + t("a", shape=(2,), offsets=(0, 8)) + "," + t("b", offsets=(4, 8)) + "}", 8), r"tensors 'a' and 'b' overlap"),
    ("hole before", image("{" + t("a", offsets=(4, 8)) + "}", 8), r"data bytes 0\.\.4 belong to no tensor"),
    ("hole between", image("{" + t("a") + "," + t("b", offsets=(8, 12)) + "}", 12), r"data bytes 4\.\.8 belong to no tensor"),
    ("hole after", image("{" + t("a") + "}", 8), r"data bytes 4\.\.8 belong to no tensor"),
    ("misaligned", image("{" + t("a", dtype="U8", offsets=(0, 1)) + "," + t("b", offsets=(1, 5)) + "}", 5), r"tensor 'b' \(F32\) starts at file offset \d+, not a multiple of 4"),
]


@pytest.mark.parametrize("weights, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_header_is_refused_by_name(tmp_path: Path, weights: bytes, message: str) -> None:
    path = volume(tmp_path, weights)
    with pytest.raises(modelwrapper.VolumeError, match=message) as err:
        modelwrapper.load(path)
    assert str(path / "model.safetensors") in str(err.value), "the error names the file"


def test_a_well_formed_header_loads(tmp_path: Path) -> None:
    header = (
        '{"__metadata__":{"format":"pt"},'
        + t("b", dtype="F16", shape=(2,), offsets=(8, 12))
        + ","
        + t("a", shape=(2,), offsets=(0, 8))
        + ","
        + t("e", shape=(0,), offsets=(12, 12))
        + "}"
    )
    loaded = modelwrapper.load(volume(tmp_path, image(header, 12)))
    assert set(loaded) == {"a", "b", "e"}
    assert loaded["a"].dtype == torch.float32 and loaded["b"].shape == (2,) and loaded["e"].numel() == 0



def test_the_fast_header_parse_accepts_only_what_the_strict_parse_accepts() -> None:
    """parse_header() tries a fast parse first and falls back to the strict
    one; mutations of a valid header (bytes changed, dropped, doubled) must
    never be accepted by the fast parse unless the strict parse accepts them
    with the same result."""
    import random

    from modelwrapper import _format

    header = "{" + ",".join(
        [
            '"__metadata__":{"format":"pt"}',
            t("a", "F32", (2, 2), (0, 16)),
            t("b", "BF16", (4,), (16, 24)),
            t("c", "I8", (0, 3), (24, 24)),
            t("d", "U8", (8,), (24, 32)),
        ]
    ) + "}"
    rng = random.Random(7)
    alphabet = b'{}[],:" 0123456789-eE.atrufnlsdxAF'
    accepted = 0
    for _ in range(3000):
        raw = bytearray(header.encode())
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(raw))
            kind = rng.randrange(3)
            if kind == 0:
                raw[pos] = rng.choice(alphabet)
            elif kind == 1:
                del raw[pos]
            else:
                raw[pos:pos] = raw[pos : pos + rng.randint(1, 12)]
        text = bytes(raw)
        n = 8 + len(text)
        fast = _format._parse_fast(text, n, 32)
        if fast is None:
            continue
        accepted += 1
        try:
            strict_json = json.loads(text, object_pairs_hook=_format._no_duplicates, parse_constant=_format._reject_constant)
        except ValueError as e:
            raise AssertionError(f"fast parse accepted {text!r}, which strict JSON refuses: {e}") from None
        metadata = strict_json.pop("__metadata__", {})
        assert metadata == fast[1], text
        entries = [_format._tensor(k, v, "bad", "x", n, 32) for k, v in strict_json.items()]
        assert entries == fast[0], text
    assert accepted > 10, "the mutations left some valid headers"
