import pytest

from potluck.errors import ModelFileError
from potluck.inference.gguf_file import inspect_gguf


def test_fixture_summary(model_path):
    s = inspect_gguf(model_path("q4_0"))
    assert (s.architecture, s.n_layers, s.context_length, s.quantization) == ("llama", 4, 256, "Q4_0")
    assert s.n_params == 3_410_176


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 this is a zip", "not a GGUF file"),
        (b"GGUF\x63\x00\x00\x00" + b"\x00" * 32, "version 99"),
        (b"GGUF\x03\x00\x00\x00\x01", "truncated"),
    ],
)
def test_bad_files_are_rejected_clearly(tmp_path, content, match):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelFileError, match=match):
        inspect_gguf(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        inspect_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0005])
def test_truncated_fixture_is_rejected(tmp_path, model_path, keep):
    data = model_path("q8_0").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(24, int(len(data) * keep))])
    with pytest.raises(ModelFileError, match=r"truncated|malformed"):
        inspect_gguf(cut)


def test_garbage_header_is_rejected(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 4096)
    with pytest.raises(ModelFileError):
        inspect_gguf(bad)
