"""`tessera serve`'s flags (tessera/serve/config.py): generated from ServerConfig's fields, the API key
also from the environment, and --chat-template as a file or the template itself."""

from __future__ import annotations

import pytest

from tessera.cli import build_parser
from tessera.errors import InvalidRequestError
from tessera.serve.config import ServerConfig
from tessera.tokenizer import load_chat_template


def serve_config(*argv: str) -> ServerConfig:
    return ServerConfig.from_cli_args(build_parser().parse_args(["serve", *argv]))


def test_flags_and_defaults(monkeypatch):
    monkeypatch.delenv("TESSERA_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert serve_config() == ServerConfig()
    cfg = serve_config("--served-model-name", "a", "b", "--api-key", "k", "--port", "9000", "--chat-template", "x.j2")
    assert (cfg.served_model_name, cfg.api_key, cfg.port, cfg.chat_template) == (["a", "b"], "k", 9000, "x.j2")


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("TESSERA_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert serve_config().api_key == "from-vllm"
    monkeypatch.setenv("TESSERA_API_KEY", "from-tessera")
    assert serve_config().api_key == "from-tessera"
    assert serve_config("--api-key", "flag").api_key == "flag"


def test_chat_template_file_or_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()
    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"
    assert load_chat_template(None) is None
    with pytest.raises(InvalidRequestError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(InvalidRequestError, match="not a valid Jinja template"):
        load_chat_template("{% if %}")
