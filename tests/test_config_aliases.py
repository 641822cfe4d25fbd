"""Model aliases and the embedding model as settings: the TOML ``[aliases]`` table, env, ``--alias``."""

from __future__ import annotations

import pytest
import typer

from potluck.cli.node import parse_aliases
from potluck.config import load_settings


def test_toml_aliases_table_and_embedding_model(tmp_path, monkeypatch):
    monkeypatch.delenv("POTLUCK_ALIASES", raising=False)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        'embedding_model = "/m/e.gguf"\n\n[aliases]\n"gpt-4o-mini" = "SmolLM2-135M-Instruct"\n"gpt-3.5-turbo" = "x"\n'
    )
    settings = load_settings(cfg)
    assert settings.aliases == {"gpt-4o-mini": "SmolLM2-135M-Instruct", "gpt-3.5-turbo": "x"}
    assert settings.embedding_model == "/m/e.gguf"
    # --alias adds to the table (pydantic-settings merges dicts across sources; a flag wins per name)
    merged = load_settings(cfg, aliases={"a": "b", "gpt-3.5-turbo": "y"}).aliases
    assert merged == {"gpt-4o-mini": "SmolLM2-135M-Instruct", "gpt-3.5-turbo": "y", "a": "b"}


def test_aliases_from_env_json(tmp_path, monkeypatch):
    monkeypatch.setenv("POTLUCK_ALIASES", '{"davinci-002": "m"}')
    assert load_settings(None).aliases == {"davinci-002": "m"}


def test_alias_flag_parsing():
    assert parse_aliases(["gpt-4o-mini=SmolLM2", " a = b "]) == {"gpt-4o-mini": "SmolLM2", "a": "b"}
    for bad in ("nomodel", "=x", "x="):
        with pytest.raises(typer.Exit):
            parse_aliases([bad])
