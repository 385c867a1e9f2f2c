"""The built-in chat formats equal each family's published format, and the format a conversation
gets follows the precedence: --chat-format > `llamadesk set` > the model's template > a guess from
the name or the vocab (said so) > plain continuation."""
from __future__ import annotations

import pytest
from tiny_checkpoints import LLAMA2_CHAT_TEMPLATE, tiny_checkpoint
from transformers.utils.chat_template_utils import render_jinja_template

from app.cli import main
from app.importer import import_checkpoint
from model.chat_format import BUILT_IN, ChatFormat, ChatTemplateError, choose_chat_format
from model.tokenizer import load_tokenizer

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
META_LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML as the models trained on it publish it (e.g. OpenHermes-2.5's tokenizer_config.json).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Stanford Alpaca's train.py PROMPT_DICT["prompt_no_input"].
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")


def fastchat_vicuna_v11(messages: list[dict]) -> str:
    """FastChat's conversation.py, template vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep " ",
    sep2 "</s>"), get_prompt() with an empty assistant turn appended."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else VICUNA_SYSTEM
    turns = [("USER" if m["role"] == "user" else "ASSISTANT", m["content"]) for m in messages if m["role"] != "system"]
    turns.append(("ASSISTANT", None))
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(turns):
        ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return ret


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?\n"}],
    [{"role": "system", "content": "You are a pirate.\n"}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": " Arr, hello. "}, {"role": "user", "content": "Where is the gold?"}],
    [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "\tand <s>[INST] this"}],
]


def reference(template: str, messages: list[dict], bos: str, eos: str) -> str:
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, bos_token=bos, eos_token=eos)
    return rendered[0]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama2_is_metas_published_template(messages):
    assert ChatFormat(BUILT_IN["llama2"], "<s>", "</s>").render(messages) == \
        reference(LLAMA2_CHAT_TEMPLATE, messages, "<s>", "</s>")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama3_is_metas_published_template(messages):
    assert ChatFormat(BUILT_IN["llama3"], "<|begin_of_text|>", "<|eot_id|>").render(messages) == \
        reference(META_LLAMA3, messages, "<|begin_of_text|>", "<|eot_id|>")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_is_the_published_template(messages):
    assert ChatFormat(BUILT_IN["chatml"], "", "<|im_end|>").render(messages) == reference(CHATML, messages, "", "")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_vicuna_is_fastchats_v11(messages):
    assert ChatFormat(BUILT_IN["vicuna"], "", "</s>").render(messages) == fastchat_vicuna_v11(messages)


def test_alpaca_is_stanfords_prompt():
    chat = ChatFormat(BUILT_IN["alpaca"], "", "</s>")
    assert chat.render([{"role": "user", "content": "Name three colors."}]) == \
        ALPACA_PROMPT.format(instruction="Name three colors.")
    # later turns follow the same pattern, each answer closed by EOS
    assert chat.render([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A"},
                        {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]) == (
        "Be kind.\n\n### Instruction:\nA\n\n### Response:\nB</s>\n\n### Instruction:\nC\n\n### Response:\n")


# ---------------------------------------------------------------------------------------------
# Precedence
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    """A SentencePiece vocab with Llama 2's chat template in its files."""
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("t"), "hf", sentencepiece=True)
    return load_tokenizer(path)


HI = [{"role": "user", "content": "Hi"}]


def test_the_flag_beats_everything(llama2_tokenizer):
    chat, where = choose_chat_format(llama2_tokenizer, "vicuna-7b", flag="chatml", stored="alpaca")
    assert where == "chatml (--chat-format)"
    assert chat.render(HI) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_stored_setting_beats_the_models_template(llama2_tokenizer):
    chat, where = choose_chat_format(llama2_tokenizer, "vicuna-7b", stored="alpaca")
    assert where == "alpaca (set by llamadesk set)"
    assert chat.render(HI).startswith("<s>Below is an instruction")


def test_the_models_template_beats_a_name_guess(llama2_tokenizer):
    chat, where = choose_chat_format(llama2_tokenizer, "vicuna-7b")
    assert where == "the model's own template"
    assert chat.render(HI) == "<s>[INST] Hi [/INST]"


def test_a_template_that_does_not_compile_falls_back_to_a_guess_and_says_why(llama2_tokenizer):
    llama2_tokenizer.chat_template, saved = "{{ {{ broken", llama2_tokenizer.chat_template
    try:
        chat, where = choose_chat_format(llama2_tokenizer, "llama-2-7b-chat")
    finally:
        llama2_tokenizer.chat_template = saved
    assert where.startswith("llama2 (guessed from the name), since the model's own template cannot be used: "
                            "the chat template does not compile (line 1: ")
    assert chat.template == BUILT_IN["llama2"]


@pytest.mark.parametrize("name, guess", [("llama-2-13b-chat.q4_0", "llama2"), ("vicuna-7b-v1.5", "vicuna"),
                                         ("alpaca-native", "alpaca")])
def test_a_name_guess_beats_plain_continuation(llama2_tokenizer, name, guess):
    llama2_tokenizer.chat_template, saved = None, llama2_tokenizer.chat_template
    try:
        chat, where = choose_chat_format(llama2_tokenizer, name)
    finally:
        llama2_tokenizer.chat_template = saved
    assert where == f"{guess} (guessed from the name)"
    assert chat.template == BUILT_IN[guess]


def test_nothing_to_go_by_is_plain_continuation(llama2_tokenizer):
    llama2_tokenizer.chat_template, saved = None, llama2_tokenizer.chat_template
    try:
        chat, where = choose_chat_format(llama2_tokenizer, "llama-2-7b")  # a base model: no "chat"
    finally:
        llama2_tokenizer.chat_template = saved
    assert where == "none: plain text continuation"
    assert chat.encode(llama2_tokenizer, [{"role": "user", "content": "Once upon"}]) == \
        [1, *llama2_tokenizer.encode("Once upon", allowed_special=set())]  # BOS, then the text


def test_an_unknown_format_is_refused(llama2_tokenizer):
    with pytest.raises(ChatTemplateError, match="unknown chat format 'llama4'"):
        choose_chat_format(llama2_tokenizer, flag="llama4")


# ---------------------------------------------------------------------------------------------
# Through the CLI: a Meta Llama 2 folder (no template anywhere)
# ---------------------------------------------------------------------------------------------

def test_cli_guesses_sets_and_overrides_the_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, "meta", sentencepiece=True)
    entry = import_checkpoint(path, name="llama-2-7b-chat")
    bare_text = len(load_tokenizer(entry.path).encode("Hi", allowed_special=set()))
    ask = ["ask", "--model", "llama-2-7b-chat", "--temperature", "0", "--max-tokens", "4", "-v", "Hi"]

    def prompt_tokens(*flags) -> tuple[int, str]:
        assert main([*ask, *flags]) == 0
        err = capsys.readouterr().err
        return int(err.split("prompt ")[1].split(" tokens")[0]), err

    guessed, err = prompt_tokens()
    assert "Chat format: llama2 (guessed from the name); `llamadesk set llama-2-7b-chat chat-format NAME`" in err
    raw, err = prompt_tokens("--raw")
    assert "Chat format: raw (--chat-format)" not in err and "guessed" not in err
    assert raw == 1 + bare_text  # BOS, then the text as it is
    assert guessed > raw
    assert main(["set", "llama-2-7b-chat", "chat-format", "raw"]) == 0
    assert prompt_tokens()[0] == raw
    assert main(["set", "llama-2-7b-chat", "chat-format", "auto"]) == 0
    assert prompt_tokens()[0] == guessed
    assert main(["set", "llama-2-7b-chat", "chat-format", "llama5"]) == 1
    assert "unknown chat format 'llama5'" in capsys.readouterr().err
