import pytest

from potluck.errors import DownloadError, ModelFileError
from potluck.inference.resolve import HubFile, cached_models, resolve_model


def test_hub_spec_parsing(tmp_path):
    assert HubFile.parse("owner/repo:file.gguf") == HubFile("owner/repo", "file.gguf")
    assert HubFile.parse("hf://owner/repo/dir/file.gguf") == HubFile("owner/repo", "dir/file.gguf")
    assert HubFile.parse("/models/x.gguf") is None
    assert HubFile.parse("x.gguf") is None


def test_local_path_is_validated(tmp_path, model_path):
    assert resolve_model(str(model_path("q4_0")), tmp_path).path == model_path("q4_0")
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"), tmp_path)


def test_no_model_and_nothing_cached_gives_demo_model(tmp_path):
    resolved = resolve_model(None, tmp_path)
    assert resolved.is_demo and resolved.path.is_file()
    assert resolved.path in list(cached_models(tmp_path))


def test_uncached_hub_model_offline_is_a_clear_error(tmp_path, hub_offline):
    with pytest.raises(DownloadError, match=r"--model PATH|cannot download"):
        resolve_model("nobody/nothing-GGUF:model.gguf", tmp_path)
