"""Our GGUF parser against the gguf package's reader and writer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.gguf import GGUFTensors
from asft_jax.io.gguf_container import GGML_TYPES, read_gguf


def assert_same_as_gguf_package(path: str, flattened: tuple[str, ...] = ()) -> dict:
    """Every metadata value and every tensor's name, shape, type and bytes, as ``GGUFReader`` reads
    them (except the values of ``flattened``: it returns nested arrays flattened); returns ours."""
    fields, index, buf = read_gguf(path)
    theirs = GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() == expected.keys()
    for key, value in expected.items():
        if key in flattened:
            continue
        if isinstance(value, float):  # they widen float32 to float64 the same way; compare as stored
            assert np.float32(fields[key]) == np.float32(value), key
        else:
            assert fields[key] == value, key
    assert len(index) == len(theirs.tensors)
    for ours, t in zip(index, theirs.tensors):
        assert (ours.name, ours.dims, ours.type_name) == (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name)
        assert ours.offset == t.data_offset
        raw = np.frombuffer(buf, np.uint8, int(t.n_bytes), ours.offset)
        np.testing.assert_array_equal(raw, np.asarray(t.data).reshape(-1).view(np.uint8))
    return fields


def test_every_value_type_and_tensor_type_reads_as_the_gguf_package_reads_it(tmp_path):
    path = str(tmp_path / "all.gguf")
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_end|>\n")
    w.add_array("t.ints", [3, -1, 7])
    w.add_array("t.floats", [0.5, -2.0])
    w.add_array("t.strs", ["a", "", "Ġthe", "中文"])
    w.add_array("t.bools", [True, False])
    w.add_key_value("t.nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("f32", values)
    w.add_tensor("f16", values.astype(np.float16))
    for qtype in ("Q8_0", "Q4_1"):
        q = GGMLQuantizationType[qtype]
        data = quants.quantize(values, q)
        w.add_tensor(qtype.lower(), data, raw_shape=data.shape, raw_dtype=q)
    k_quant = rng.integers(0, 256, (4, 144), dtype=np.uint8)  # one Q4_K block per row: indexed, never decoded
    w.add_tensor("q4_k", k_quant, raw_shape=k_quant.shape, raw_dtype=GGMLQuantizationType.Q4_K)
    w.add_tensor("vector", np.arange(5, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert assert_same_as_gguf_package(path, flattened=("t.nested",))["t.nested"] == [[1, 2], [3]]


def test_the_real_smollm2_reads_as_the_gguf_package_reads_it(smollm2_gguf):
    assert_same_as_gguf_package(smollm2_gguf)


def test_tensor_type_names_are_ggmls():
    known = {m.value: m.name for m in GGMLQuantizationType}
    assert {i: known[i] for i in GGML_TYPES if i in known} == {i: GGML_TYPES[i] for i in GGML_TYPES if i in known}


def write_tiny(path: str) -> None:
    w = GGUFWriter(path, "llama")
    w.add_head_count(2)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize(
    "cut, message",
    [
        (0, r"not a readable GGUF file \(empty\)"),
        (3, r"not a readable GGUF file \(it ends at byte 3, inside its header: truncated\?\)"),
        (60, r"not a readable GGUF file \(it ends at byte 60, inside its header: truncated\?\)"),
        (-4, r"tensor 'token_embd\.weight' runs past the end of the file \(truncated\?\)"),
    ],
)
def test_a_cut_short_file_is_one_line_naming_it(tmp_path, cut, message):
    whole = tmp_path / "whole.gguf"
    write_tiny(str(whole))
    data = whole.read_bytes()
    cut_path = tmp_path / "cut.gguf"
    cut_path.write_bytes(data[:cut])
    with pytest.raises(AsftError, match=r"cut\.gguf: " + message):
        GGUFTensors(str(cut_path))


def test_other_files_are_named_for_what_they_are(tmp_path):
    (tmp_path / "st.gguf").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(AsftError, match=r"st\.gguf: not a readable GGUF file \(starts with b'\\x08"):
        resolve(str(tmp_path / "st.gguf"))
    (tmp_path / "v1.gguf").write_bytes(b"GGUF\x01\x00\x00\x00" + b"\x00" * 16)
    with pytest.raises(AsftError, match=r"v1\.gguf: not a readable GGUF file \(version 1 \(this reader knows"):
        resolve(str(tmp_path / "v1.gguf"))
