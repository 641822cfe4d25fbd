import pytest

from potluck.config import DEFAULT_PORT, load_settings
from potluck.errors import ConfigError


def test_layering_flags_env_file_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text('port = 9001\nhost = "0.0.0.0"\nmax_queue = 3\n')
    monkeypatch.setenv("POTLUCK_PORT", "9002")
    monkeypatch.setenv("POTLUCK_MAX_QUEUE", "4")
    s = load_settings(cfg, port=9003)
    assert s.port == 9003  # flag beats env
    assert s.max_queue == 4  # env beats file
    assert s.host == "0.0.0.0"  # file beats default
    assert s.n_ctx == 2048  # default


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.setattr("potluck.config.default_config_file", lambda: tmp_path / "missing.toml")
    assert load_settings().port == DEFAULT_PORT


def test_bad_values_are_config_errors(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 70000\n")
    with pytest.raises(ConfigError, match="port"):
        load_settings(cfg)
    cfg.write_text("port = [\n")
    with pytest.raises(ConfigError):
        load_settings(cfg)
    cfg.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_memory_budget_parses_sizes_and_is_refused_where_nothing_uses_it(tmp_path, monkeypatch):
    monkeypatch.setattr("potluck.config.default_config_file", lambda: tmp_path / "missing.toml")
    s = load_settings(memory_budget="2GiB")
    assert s.effective_memory_budget() == 2 << 30
    assert load_settings().effective_memory_budget() > 0  # 80 % of the available RAM
    with pytest.raises(ConfigError, match="memory_budget limits tensor-parallel ranks"):
        load_settings(memory_budget="2GiB", tensor_parallel=1, tp_worker=False)
    with pytest.raises(ConfigError, match="memory_budget"):
        load_settings(memory_budget="lots")
