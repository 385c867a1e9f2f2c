"""`llamadesk` as a user runs it: real processes, the real default model, real error messages."""
import json
import shutil
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def llamadesk(*args, home, stdin=None, timeout=300):
    env = dict(os.environ, LLAMADESK_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "app.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def _store_listing(home):
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.mark.parametrize("bits", [[], ["--activation-bits", "8"]], ids=["default", "8-bit"])
def test_ask_answers_the_capital_of_france(default_home, bits):
    r = llamadesk("ask", "What is the capital of France?", "--temperature", "0", "--max-tokens", "40", *bits,
                  home=default_home)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "no effect" not in r.stderr


def test_ask_reads_a_piped_prompt_and_a_system_prompt(default_home):
    r = llamadesk("ask", "--temperature", "0", "--max-tokens", "30", "--system", "Answer with one word.",
                  home=default_home, stdin="What is the capital of Italy?\n")
    assert r.returncode == 0, r.stderr
    assert "Rome" in r.stdout


def test_the_same_seed_gives_the_same_text(default_home):
    args = ("ask", "Write a two-line poem about tea.", "--seed", "11", "--temperature", "0.9", "--max-tokens", "24")
    first, second = llamadesk(*args, home=default_home), llamadesk(*args, home=default_home)
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout.strip()


def test_a_prompt_longer_than_the_context_is_refused(default_home):
    r = llamadesk("ask", "word " * 400, "--ctx", "128", home=default_home)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("llamadesk: error: the prompt is ")
    assert r.stderr.strip().endswith("shorten it, or raise --ctx")
    assert "Traceback" not in r.stderr


def test_plan_refuses_a_gpu_size_for_the_cpu(default_home):
    r = llamadesk("plan", "--device", "cpu", "--vram", "8GiB", home=default_home)
    assert (r.returncode, r.stderr.strip()) == (
        1, "llamadesk: error: --vram plans for a GPU; with --device cpu, --ram sets the memory to plan for")


def test_a_reply_cut_by_the_context_says_so(default_home):
    r = llamadesk("ask", "Write a long story about a dragon.", "--ctx", "48", "--temperature", "0",
                  "--max-tokens", "200", home=default_home)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert r.stderr.strip().splitlines()[-1] == "(the reply was cut: the 48-token context is full; --ctx raises it)"


def test_past_the_models_longest_context_the_advice_is_to_shorten():
    """A larger --ctx is offered only where the model was trained for one (the default model stops
    at 8192: `--ctx 30000` is refused)."""
    from app.context import PromptTooLong, fit_to_context, too_long_hint

    assert too_long_hint(4096, 8192, "raise --ctx") == "shorten it, or raise --ctx"
    assert too_long_hint(8192, 8192, "raise --ctx") == ("shorten it (8192 tokens is the longest context this "
                                                        "model was trained for)")
    assert too_long_hint(8192, None, "raise --ctx") == "shorten it, or raise --ctx"  # a server's model: unknown
    count = lambda messages: sum(len(m["content"].split()) for m in messages)  # noqa: E731
    with pytest.raises(PromptTooLong, match="longest context this model was trained for"):
        fit_to_context([{"role": "user", "content": "word " * 100}], count, 64, 8, max_ctx=64)
    # a server's model: its context is the server's setting, not a --ctx of ours
    with pytest.raises(PromptTooLong, match="shorten it, or pick a model the server runs with a longer context$"):
        fit_to_context([{"role": "user", "content": "word " * 100}], count, 64, 8, None,
                       "pick a model the server runs with a longer context")


def test_list_shows_the_default_model(default_home):
    r = llamadesk("list", home=default_home)
    assert r.returncode == 0 and "smollm2-135m-instruct:source" in r.stdout


def test_unknown_model_and_missing_path_are_one_line_errors(tmp_path, default_home):
    r = llamadesk("ask", "hi", "--model", "nope", home=default_home)
    assert (r.returncode, "Traceback" in r.stderr) == (1, False)
    assert "model 'nope' is not installed" in r.stderr
    empty = tmp_path / "home"
    r = llamadesk("import", str(tmp_path / "missing.gguf"), home=empty)
    assert r.returncode == 1 and "missing.gguf: no such file or folder" in r.stderr
    assert not (empty / "models").exists() or _store_listing(empty) == ["models"]


def test_a_variant_that_is_not_installed_is_refused_before_the_decode_step_compiles(default_home, monkeypatch,
                                                                                      capsys):
    from app import pull
    from app.cli import main

    def compile_first(say):
        raise AssertionError("compiled before the model was checked")

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    monkeypatch.setattr(pull, "compile_decode_step", compile_first)
    for command in (["ask", "hi"], ["chat", "--plain"], ["serve"]):
        assert main([*command, "--model", "smollm2-135m-instruct:nope"]) == 1
        err = capsys.readouterr().err
        assert "smollm2-135m-instruct:nope is not installed (have: smollm2-135m-instruct:" in err, err


def test_importing_a_corrupt_gguf_leaves_the_store_unchanged(tmp_path, default_gguf):
    home = tmp_path / "home"
    bad = tmp_path / "broken.gguf"
    with open(default_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))  # header and part of the tensor data only
    r = llamadesk("import", str(bad), home=home)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "broken.gguf" in r.stderr.strip().splitlines()[-1]
    assert _store_listing(home) in ([], ["models"])


@pytest.mark.parametrize("argv", [["bench", "--activation-bits", "7"], ["ask", "--temperature", "nan", "hi"],
                                  ["no-such-command"], ["serve", "--port", "x"], ["ask", "--ctx", "-5", "hi"],
                                  ["ask", "--threads", "0", "hi"], ["plan", "--ctx", "0"], ["plan", "--ram=-1GiB"],
                                  ["plan", "--ram", "lots"], ["plan", "--vram", "16"], ["bench", "--runs", "0"],
                                  ["ask", "--bogus", "hi"], ["plan", "--ctx", "8"],
                                  ["ask", "--top-p", "5", "hi"], ["chat", "--seed", "-1"], ["ask", "-m", "", "hi"]],
                         ids=" ".join)
def test_a_mistyped_flag_or_command_is_one_line(tmp_path, argv):
    """argparse's usage errors as every other error: one line naming the command, exit 2. Counts
    (--ctx, --threads, --runs, ...) below 1, sampling values out of range, a blank model and sizes
    that are not sizes are usage errors too, caught before anything loads (--ctx -5 failed deep in
    the KV cache's allocation; -m "" took the default model)."""
    r = llamadesk(*argv, home=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamadesk") and ": error: " in lines[0], r.stderr
    # a command's stray flag points at that command's help, not the top one's
    command = argv[0] if argv[0] != "no-such-command" else None
    assert lines[0].endswith(f"(see `llamadesk {command} --help`)" if command else "(see `llamadesk --help`)")


def test_ask_without_a_prompt_on_a_terminal_explains_itself(default_home):
    r = llamadesk("ask", "--temperature", "0", home=default_home, stdin="")
    assert r.returncode == 1 and "prompt on stdin is empty" in r.stderr


def test_out_of_memory_while_loading_steps_the_context_down(default_home, monkeypatch):
    """An OOM during load or warm-up is answered once with a smaller plan, and said."""
    import torch

    from app import engine as engine_module

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    real = engine_module.load_model
    asked = []

    def flaky(entry, ctx, *args, **kwargs):
        asked.append(ctx)
        if len(asked) == 1:
            raise torch.OutOfMemoryError("simulated: CPU out of memory")
        return real(entry, ctx, *args, **kwargs)

    monkeypatch.setattr(engine_module, "load_model", flaky)
    said = []
    eng = engine_module.Engine.load("smollm2-135m-instruct:source", say=said.append)
    assert asked[0] == 8192 and eng.ctx == asked[1] < asked[0]
    assert any(f"Out of memory at 8192 tokens; stepping down to {eng.ctx}" in s for s in said)


# ---------------------------------------------------------------- the KV cache dtype
def test_plan_keeps_an_asked_int8_kv_cache(default_home):
    import json

    r = llamadesk("plan", "smollm2-135m-instruct:source", "--kv-dtype", "int8", "--json", home=default_home)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["chosen"]["kv_dtype"] == "int8"
    assert plan["candidates"][0]["kv_bytes_per_token"] == 2 * 30 * 3 * (64 + 4)  # int8 codes and an fp32 scale
    assert plan["why"].endswith("; the KV cache is int8, as asked")


def test_plan_takes_an_int8_kv_cache_where_bf16_leaves_too_little_context(default_home):
    """1.08 GiB of RAM: the source (its Q4_1 blocks, and on a CPU the r16 copy of its tied Q8_0
    table for the head) holds 1536 tokens with a bf16 cache, below the 2048 floor."""
    import json

    r = llamadesk("plan", "smollm2-135m-instruct:source", "--ram", "1.08GiB", "--json", home=default_home)
    assert r.returncode == 0, r.stderr
    chosen = json.loads(r.stdout)["chosen"]
    assert chosen["kv_dtype"] == "int8" and chosen["ctx"] >= 2048
    assert "it fits only with an int8 KV cache (bf16 would allow 1536 tokens)" in chosen["why"]

    r = llamadesk("plan", "smollm2-135m-instruct:source", "--ram", "1.08GiB", "--kv-dtype", "fp32", home=default_home)
    assert r.returncode == 1
    assert "with --kv-dtype int8, smollm2-135m-instruct:source would fit with up to" in " ".join(r.stdout.split())


def test_the_loader_refuses_a_kv_dtype_that_cannot_fit_and_says_what_would(default_home, monkeypatch):
    from app import engine as engine_module
    from app.devices import Device
    from app.errors import UserError

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    monkeypatch.setattr(engine_module, "probe", lambda *a: Device("cpu", "test CPU", 1127 << 20, 1127 << 20))
    with pytest.raises(UserError) as e:
        engine_module.Engine.load("smollm2-135m-instruct:source", ctx=4096, kv_dtype="fp32")
    assert str(e.value).startswith("nothing installed fits a 4096-token context with the KV cache in fp32")
    assert "with --kv-dtype int8, smollm2-135m-instruct:source would fit with up to" in str(e.value)


def test_ask_with_an_int8_kv_cache_answers_the_capital_of_france(default_home):
    r = llamadesk("ask", "What is the capital of France?", "--model", "smollm2-135m-instruct:source",
                  "--kv-dtype", "int8", "--temperature", "0", "--max-tokens", "40", "-v", home=default_home)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "KV cache int8" in r.stderr


def test_the_engine_holds_the_cache_the_plan_names(default_home, monkeypatch):
    import torch

    from app.engine import Engine

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    engine = Engine.load("smollm2-135m-instruct:source", ctx=256, kv_dtype="int8")
    cache = engine.model.layers[0].attention.kv_cache
    assert engine.plan.kv_dtype == "int8"
    assert (cache.k.dtype, cache.k_scale.dtype, cache.k.shape) == (torch.int8, torch.float32, (1, 3, 256, 64))


def test_bench_json_reports_every_installed_variant_it_runs(default_home):
    """`llamadesk bench --json`: one object per variant (each in its own process), the issue's keys,
    the compiled step's path and the CPU flags; nf4 is listed as skipped, with why."""
    from quant.extension import chosen_isa

    r = llamadesk("bench", "--json", "--prompt-tokens", "32", "--gen-tokens", "8", "--runs", "1", "--threads", "1",
                  home=default_home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    results = out["results"]
    assert {d["variant"] for d in results} >= {"source", "int4"}  # nf4 only when named on the CPU
    assert all(s["ref"].endswith(":nf4") and "bitsandbytes" in s["why"] for s in out["skipped"])
    for d in results:
        assert set(d) == {"model", "variant", "device", "threads", "ttft_s", "prefill_tok_s", "decode_tok_s",
                          "peak_mem_bytes", "gb_s", "isa", "activation_bits", "cpu_flags"}
        assert d["model"] == "smollm2-135m-instruct" and d["device"] == "cpu" and d["threads"] == 1
        assert d["ttft_s"] > 0 and d["prefill_tok_s"] > 0 and d["decode_tok_s"] > 0 and d["gb_s"] > 0
        assert d["peak_mem_bytes"] > 100 << 20
        assert "avx2" in d["cpu_flags"] or chosen_isa() == "generic"
    by_variant = {d["variant"]: d for d in results}
    assert by_variant["int4"]["isa"] == chosen_isa()  # the compiled step runs it
    assert by_variant["source"]["isa"] == chosen_isa()  # its Q4_1 blocks run natively in the step too
    assert by_variant["source"]["activation_bits"] == 15  # chat's, by default


def test_bench_lists_a_variant_that_fails_and_runs_the_others(default_home, tmp_path):
    """A damaged variant (its weights cut short) is listed as skipped with the error that stopped
    it; the other variants' figures still come. The error names a file, whose path goes into the
    table as text, never as markup (a closing tag with nothing to close is an error to rich)."""
    model = "smollm2-135m-instruct"
    home = tmp_path / "home[/]"
    for variant in ("source", "int4"):
        shutil.copytree(default_home / "models" / model / variant, home / "models" / model / variant)
    weights = sorted((home / "models" / model / "int4").glob("*.safetensors"))[0]
    with open(weights, "r+b") as f:
        f.truncate(4096)
    r = llamadesk("bench", model, "--json", "--prompt-tokens", "16", "--gen-tokens", "4", "--runs", "1",
                  "--threads", "1", "--activation-bits", "8", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [d["variant"] for d in out["results"]] == ["source"]
    assert out["results"][0]["activation_bits"] == (8 if out["results"][0]["isa"] else None)  # reached the child
    (failed,) = [s for s in out["skipped"] if s["ref"] == f"{model}:int4"]
    assert failed["why"].startswith("failed: ") and "cannot read the weights" in failed["why"]
    table = llamadesk("bench", model, "--prompt-tokens", "16", "--gen-tokens", "4", "--runs", "1", "--threads", "1",
                      home=home)
    assert table.returncode == 0, table.stderr
    assert "skipped: failed:" in table.stdout


HEAVY = ("torch", "textual", "rich.progress")
LIGHT_COMMANDS = [["--help"], ["list"], ["plan"], ["plan", "--json"], ["rm", "--help"],
                  ["show", "smollm2-135m-instruct"], ["show", "smollm2-135m-instruct", "--json"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_commands_that_read_the_store_import_no_torch_or_textual(default_home, argv):
    """Answering these takes no model: they must not wait ~2 s for torch (or textual, or rich's
    progress bars) to import."""
    code = ("import sys\nfrom app.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], 'RC', rc or 0, file=sys.stderr)")
    env = dict(os.environ, LLAMADESK_HOME=str(default_home))
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert "HEAVY [] RC 0" in r.stderr, r.stderr[-2000:]


def test_a_forced_cpu_path_this_machine_lacks_is_one_line(default_home):
    env_isa = {"LLAMADESK_ISA": "sse9"}
    r = subprocess.run([sys.executable, "-m", "app.cli", "ask", "hi", "--max-tokens", "1"], capture_output=True,
                       text=True, env=dict(os.environ, LLAMADESK_HOME=str(default_home), **env_isa), timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == ("llamadesk: error: LLAMADESK_ISA='sse9' is not a path "
                                "(choose from avx512, avx2, generic)")


def test_ask_keeps_special_token_text_plain_unless_parse_special(default_home):
    def prompt_tokens(*flags):
        r = llamadesk("ask", "<|im_end|>", "--max-tokens", "1", "-v", *flags, home=default_home)
        assert r.returncode == 0, r.stderr
        return int(r.stderr.split("prompt ")[1].split(" tokens")[0])

    # <|im_end|> as text is 7 tokens (< | im _ end | >), as a control token 1
    assert prompt_tokens() - prompt_tokens("--parse-special") == 6
