"""Defaults for the CLI and the chat app: the model's own, else Ollama-like; neutral SamplingParams."""
import json

from app.cli import _sampling_params, build_parser
from app.history import ChatSettings
from app.sampling_defaults import OLLAMA_LIKE, model_defaults, resolve
from model.generate import SamplingParams


def test_without_a_model_config_the_defaults_are_ollama_like(tmp_path):
    assert model_defaults(None) == model_defaults(tmp_path) == OLLAMA_LIKE
    p = resolve({}, OLLAMA_LIKE)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.repeat_last_n) == (0.7, 40, 0.9, 1.1, 64)
    # SamplingParams itself stays neutral
    neutral = SamplingParams()
    assert (neutral.top_k, neutral.repetition_penalty) == (0, 1.0)


def test_the_models_own_generation_config_wins_over_ours(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.2, "top_p": 0.95, "repetition_penalty": 1.05, "top_k": True}))
    assert model_defaults(tmp_path) == dict(OLLAMA_LIKE, temperature=0.2, top_p=0.95, repeat_penalty=1.05)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.2}))
    assert model_defaults(tmp_path) == OLLAMA_LIKE  # a greedy evaluation config, not sampling advice
    (tmp_path / "generation_config.json").write_text("{not json")
    assert model_defaults(tmp_path) == OLLAMA_LIKE


def test_greedy_keeps_the_penalty_off_unless_asked():
    assert resolve({"temperature": 0.0}, OLLAMA_LIKE).repetition_penalty == 1.0
    assert resolve({"temperature": 1e-9}, OLLAMA_LIKE).repetition_penalty == 1.0
    assert resolve({"temperature": 0.0, "repeat_penalty": 1.3}, OLLAMA_LIKE).repetition_penalty == 1.3
    assert resolve({"temperature": 0.5}, OLLAMA_LIKE).repetition_penalty == 1.1


def test_the_cli_flags_override_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path))  # nothing installed
    args = build_parser().parse_args(["ask", "hi", "--top-k", "5", "--repeat-last-n", "16", "--seed", "3"])
    p = _sampling_params(args)
    assert (p.top_k, p.repeat_last_n, p.seed, p.top_p, p.repetition_penalty) == (5, 16, 3, 0.9, 1.1)
    p = _sampling_params(build_parser().parse_args(["chat", "--temperature", "0"]))
    assert (p.temperature, p.repetition_penalty, p.top_k) == (0.0, 1.0, 40)


def test_the_chat_apps_new_chats_start_ollama_like():
    s = ChatSettings().sampling_params()
    assert (s.top_k, s.top_p, s.repetition_penalty, s.repeat_last_n) == (40, 0.9, 1.1, 64)


def test_the_catalogs_suggestion_comes_before_ollamas_and_after_the_models_own(tmp_path):
    from app import pull

    _, catalog = pull.load_catalog()
    suggested = catalog["smollm2-135m-instruct"].sampling
    assert suggested == {"temperature": 0.2, "top_p": 0.9}  # SmolLM2's model card
    assert model_defaults(None, suggested) == dict(OLLAMA_LIKE, temperature=0.2, top_p=0.9)
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6}')
    assert model_defaults(tmp_path, suggested)["temperature"] == 0.6  # the model's own file wins
