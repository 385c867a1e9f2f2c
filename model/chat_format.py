"""Chat messages -> the prompt a model was trained on. No torch.

The model's own jinja chat template (GGUF `tokenizer.chat_template`, tokenizer_config.json
`chat_template`) is the truth; it runs in the environment transformers uses, so it renders the
same text here as on the Hub. A model without one gets Llama 3's or ChatML's format, chosen by
which special tokens its vocab has.

Templates come from downloaded files, so they are untrusted code: they run in jinja2's immutable
sandbox, and anything they try that the sandbox forbids is refused with a ChatTemplateError.
"""
from __future__ import annotations

import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """A chat template that does not compile, fails while rendering, or tries something unsafe."""


# Meta-Llama-3-Instruct's template: a header per message, content trimmed, <|eot_id|> after each.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 chat, as Meta's chat_completion builds it: each user turn "<s>[INST] ... [/INST]", the
# system prompt folded into the first one inside <<SYS>>, each answer " ... </s>".
LLAMA2_TEMPLATE = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}"
    "{% set text = message['content'] if system is none or not loop.first"
    " else '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
    "{{ bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Stanford Alpaca's prompt (its preamble unless a system message replaces it), turn after turn.
ALPACA_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ bos_token + messages[0]['content'] | trim + '\n\n' }}"
    "{% else %}{{ bos_token + 'Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n' }}{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] | trim + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] | trim + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# Vicuna v1.1 (FastChat's vicuna_v1.1): "SYSTEM USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:".
VICUNA_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ bos_token + messages[0]['content'] + ' ' }}"
    "{% else %}{{ bos_token + 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions. ' }}{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# No chat format at all (a base model): the text continues, messages one after another.
RAW_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endfor %}"

BUILT_IN = {"llama2": LLAMA2_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE,
            "alpaca": ALPACA_TEMPLATE, "vicuna": VICUNA_TEMPLATE, "raw": RAW_TEMPLATE}

# A model without a template whose name says what it was tuned on.
_NAME_GUESSES = (("llama-2", "chat", "llama2"), ("llama2", "chat", "llama2"), ("vicuna", "", "vicuna"),
                 ("alpaca", "", "alpaca"))

# Tokens that end an assistant turn, on top of the tokenizer's own EOS.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>")


class ChatFormat:
    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not compile (line {e.lineno}: "
                                    f"{e.message})") from e

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, template: str | None) -> ChatFormat:
        """The model's template, or else the built-in format its special tokens call for, or
        plain continuation (see choose_chat_format)."""
        if template is None:
            return _guess_format(tokenizer, "")[0]

        def piece(token_id: int | None) -> str:
            return "" if token_id is None else tokenizer.id_to_piece(token_id)

        return cls(template, bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for message in messages:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ChatTemplateError(f"a message needs a 'role' and a 'content' string, "
                                        f"got {message!r:.120}")
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the chat template was refused: it tried something unsafe "
                                    f"({e})") from e
        except Exception as e:  # the template is foreign code: any failure is its failure
            raise ChatTemplateError(f"the chat template failed to render: "
                                    f"{type(e).__name__}: {e}") from e

    def encode(self, tokenizer: Tokenizer, messages: list[dict],
               add_generation_prompt: bool = True, parse_special: bool = False) -> list[int]:
        """Prompt ids. Special-token text the template writes (headers, BOS, end of turn) becomes
        special ids; special-token text inside a message's content stays plain text, so a user
        cannot forge a turn. `parse_special` lets content's special text through too."""
        if parse_special:
            ids = tokenizer.encode(self.render(messages, add_generation_prompt), allowed_special="all")
        else:
            ids = _encode_structure_only(self, tokenizer, messages, add_generation_prompt)
        # A model that wants BOS gets exactly one: many templates write bos_token themselves.
        if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id] + ids
        return ids

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        """Ids that end the assistant's turn."""
        ends = {tokenizer.special_tokens[t] for t in _END_OF_TURN if t in tokenizer.special_tokens}
        return set(tokenizer.eos_ids) | ends


def choose_chat_format(tokenizer: Tokenizer, name: str = "", flag: str | None = None,
                       stored: str | None = None) -> tuple[ChatFormat, str]:
    """The format a conversation with this model is written in, and where it came from.

    In order: `flag` (one run's --chat-format), `stored` (`llamadesk set NAME chat-format X`),
    the model's own template, a guess from the model's `name` or from its vocab's special tokens
    (said so: "guessed ..."; also where the model's template does not compile), and last plain
    continuation ("none"). Errors: ChatTemplateError for a built-in name that does not exist.
    """
    for chosen, where in ((flag, "--chat-format"), (stored, "set by llamadesk set")):
        if chosen:
            return ChatFormat.for_tokenizer(tokenizer, _built_in(chosen)), f"{chosen} ({where})"
    if tokenizer.chat_template:
        try:
            return ChatFormat.for_tokenizer(tokenizer, tokenizer.chat_template), "the model's own template"
        except ChatTemplateError as e:  # as llama.cpp: a model whose file holds a broken template still chats
            chat, where = _guess_format(tokenizer, name)
            return chat, f"{where}, since the model's own template cannot be used: {e}"
    return _guess_format(tokenizer, name)


def _guess_format(tokenizer: Tokenizer, name: str) -> tuple[ChatFormat, str]:
    lowered = name.lower()
    for part, also, guess in _NAME_GUESSES:
        if part in lowered and also in lowered:
            return ChatFormat.for_tokenizer(tokenizer, BUILT_IN[guess]), f"{guess} (guessed from the name)"
    specials = tokenizer.special_tokens
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        return ChatFormat.for_tokenizer(tokenizer, LLAMA3_TEMPLATE), "llama3 (guessed from its special tokens)"
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        return ChatFormat.for_tokenizer(tokenizer, CHATML_TEMPLATE), "chatml (guessed from its special tokens)"
    return ChatFormat.for_tokenizer(tokenizer, RAW_TEMPLATE), "none: plain text continuation"


def _built_in(name: str) -> str:
    if name not in BUILT_IN:
        raise ChatTemplateError(f"unknown chat format {name!r}; built in are {', '.join(BUILT_IN)}")
    return BUILT_IN[name]


def _encode_structure_only(chat: ChatFormat, tokenizer: Tokenizer, messages: list[dict],
                           add_generation_prompt: bool) -> list[int]:
    """Render with each special token's text in the content swapped for a private-use character
    no message holds, so what the template writes is the only special text left; cut the prompt
    at that, and encode the text between as plain text with the content's characters put back.

    Swapping before rendering (not searching for the content afterwards) keeps the template's
    own filters working (`| trim`) and cannot mistake a header for content that repeats it.
    """
    specials = sorted((t for t in tokenizer.special_tokens if t), key=len, reverse=True)
    if not specials:
        return tokenizer.encode(chat.render(messages, add_generation_prompt), allowed_special=set())
    taken = set(chat.template).union(*(m["content"] for m in messages
                                       if isinstance(m, dict) and isinstance(m.get("content"), str)))
    free = (chr(c) for c in range(_PRIVATE_USE, _PRIVATE_USE + 0xFFFE) if chr(c) not in taken)
    stand_in = dict(zip(specials, free))
    if len(stand_in) < len(specials):
        raise ChatTemplateError("the messages use every private-use character; cannot keep control "
                                "tokens out of them")
    find = re.compile("|".join(map(re.escape, specials)))
    swapped = [{**m, "content": find.sub(lambda hit: stand_in[hit.group()], m["content"])}
               if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in messages]
    back = {ord(ch): special for special, ch in stand_in.items()}
    text = chat.render(swapped, add_generation_prompt)
    ids: list[int] = []
    start = 0
    for hit in find.finditer(text):
        if hit.start() > start:
            ids += tokenizer.encode(text[start:hit.start()].translate(back), allowed_special=set())
        ids.append(tokenizer.special_tokens[hit.group()])
        start = hit.end()
    if start < len(text):
        ids += tokenizer.encode(text[start:].translate(back), allowed_special=set())
    return ids


_PRIVATE_USE = 0xF0000  # Supplementary Private Use Area-A: no tokenizer gives these meaning


def _environment() -> ImmutableSandboxedEnvironment:
    """The jinja environment transformers renders chat templates in (utils/chat_template_utils)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    # transformers also swaps jinja's `dict` and `namespace` for versions that cannot reach
    # Python internals through type objects or underscore-named attributes.
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a template namespace cannot hold underscore-named attributes ({name!r})")
