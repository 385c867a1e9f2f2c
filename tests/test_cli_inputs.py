"""What a user types and what a home holds, through real `llamadesk` processes: prompts from the
shell (trailing whitespace, blank, not UTF-8), bad homes and damaged model files.

Every error must be one line naming the file and what to do, exit 1 (2 for usage, 130 for Ctrl-C),
never a traceback, and nothing half-written.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from app.prompt_text import from_shell, prompt_text
from app.errors import UserError


def llamadesk(*args, home, stdin: bytes | None = b"", timeout=300) -> subprocess.CompletedProcess:
    """Runs with bytes in and bytes out (the tests feed bytes that are not UTF-8), under a UTF-8
    locale; stdout and stderr come back decoded with U+FFFD."""
    env = dict(os.environ, LLAMADESK_HOME=str(home), LC_ALL="C.UTF-8", LANG="C.UTF-8", PYTHONUTF8="0")
    r = subprocess.run([sys.executable, "-m", "app.cli", *args], input=stdin, capture_output=True, env=env,
                       timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("llamadesk: error: "), lines
    return lines[0]


# ---------------------------------------------------------------- the rules, as functions
def test_only_trailing_whitespace_goes():
    assert prompt_text("  two\n lines \t\n\n") == "  two\n lines"
    assert prompt_text("[/] x") == "[/] x"
    for blank in ("", " ", "\n", " \t\n\r\n"):
        with pytest.raises(UserError, match="is empty"):
            prompt_text(blank)


def test_undecodable_bytes_become_replacement_characters_with_one_warning():
    warnings = []
    text = b"caf\xe9 \xff\xfe ok".decode("utf-8", "surrogateescape")
    assert from_shell(text, warnings.append) == "caf\ufffd \ufffd\ufffd ok"
    assert len(warnings) == 1 and "3 bytes" in warnings[0] and "not valid UTF-8" in warnings[0]
    assert from_shell("caf\u00e9", warnings.append) == "caf\u00e9" and len(warnings) == 1


# ---------------------------------------------------------------- prompts, by process
@pytest.mark.e2e
def test_a_piped_prompt_is_answered_as_the_same_argument_is(default_home):
    flags = ("--temperature", "0", "--max-tokens", "24")
    by_argument = llamadesk("ask", "What is the capital of France?", *flags, home=default_home)
    piped = llamadesk("ask", *flags, home=default_home, stdin=b"What is the capital of France?\n\n")
    assert by_argument.returncode == piped.returncode == 0, piped.stderr
    assert "Paris" in piped.stdout
    assert piped.stdout == by_argument.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("args, stdin", [
    (("",), b""), (("  \n\t",), b""), (("-",), b"   \n\n"), ((), b""), ((), b" \t\r\n"),
])
def test_a_blank_prompt_is_refused_in_one_line(tmp_path, args, stdin):
    # an empty home: refusing must come before anything is loaded or downloaded
    r = llamadesk("ask", *args, home=tmp_path, stdin=stdin)
    assert r.returncode == 1
    assert "is empty" in one_error_line(r)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["stdin", "argument", "system"])
def test_ask_reads_bytes_that_are_not_utf8_with_one_warning(default_home, how):
    bad = b"Say caf\xe9 once."
    args = {"stdin": (), "argument": (bad,), "system": (b"Say hi.", b"--system", bad)}[how]
    r = llamadesk("ask", *args, "--temperature", "0", "--max-tokens", "8", home=default_home,
                  stdin=bad if how == "stdin" else b"")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if "not valid UTF-8" in line]
    assert len(warnings) == 1 and "1 byte read as \ufffd" in warnings[0]
    assert r.stdout.strip()


@pytest.mark.e2e
def test_chat_plain_reads_bytes_that_are_not_utf8_with_one_warning(default_home):
    r = llamadesk("chat", "--plain", "--temperature", "0", home=default_home,
                  stdin=b"caf\xe9?\nWhat is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if "not valid UTF-8" in line]) == 1
    assert "Paris" in r.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "inf"), ("--repeat-penalty", "-inf")])
def test_nan_and_infinite_settings_are_refused_when_parsed(tmp_path, flag, value):
    r = llamadesk("ask", "hi", f"{flag}={value}", home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"argument {flag}: invalid number value: '{value}'" in r.stderr.splitlines()[-1]


# ---------------------------------------------------------------- bad homes, damaged files
EVERY_COMMAND = [("pull",), ("import", "model.gguf"), ("list",), ("rm", "x"), ("plan",), ("ask", "hi"),
                 ("chat", "--plain"), ("eval", "x"), ("bench",), ("quantize", "x", "--scheme", "int8")]


def bad_homes(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {"a file": (a_file, "is a file, not a folder"),
            "under a file": (a_file / "home", "cannot create the llamadesk home (Not a directory)")}


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: c[0])
def test_every_command_names_a_bad_home_in_one_line(tmp_path, monkeypatch, capsys, command):
    from app.cli import main

    for home, says in bad_homes(tmp_path).values():
        monkeypatch.setenv("LLAMADESK_HOME", str(home))
        assert main(list(command)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"llamadesk: error: {home}: ") and says in err
        assert "set LLAMADESK_HOME to a folder you can write" in err


@pytest.mark.e2e
@pytest.mark.parametrize("command", [("pull",), ("ask", "hi"), ("chat", "--plain")], ids=lambda c: c[0])
def test_a_bad_home_by_process(tmp_path, command):
    for home, says in bad_homes(tmp_path).values():
        r = llamadesk(*command, home=home)
        assert r.returncode == 1
        line = one_error_line(r)
        assert str(home) in line and says in line


@pytest.fixture
def damaged_home(tmp_path, default_home):
    """A home whose only model has a weights file with an overwritten header; its other files are
    links to the cached default model's."""
    source = default_home / "models" / "smollm2-135m-instruct" / "source"
    home = tmp_path / "home"
    target = home / "models" / "smollm2-135m-instruct" / "source"
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix == ".safetensors":
            with open(f, "rb") as src:
                data = bytearray(src.read(1 << 16))
            data[:16] = b"garbage!garbage!"
            (target / f.name).write_bytes(bytes(data))
        else:
            (target / f.name).symlink_to(f)
    return home


@pytest.mark.e2e
@pytest.mark.parametrize("command", [("ask", "hi"), ("ask", "hi", "-m", "smollm2-135m-instruct:source"),
                                     ("chat", "--plain"), ("plan",), ("eval", "smollm2-135m-instruct")],
                         ids=lambda c: " ".join(c))
def test_a_damaged_weights_file_is_named_with_what_to_do(damaged_home, command):
    r = llamadesk(*command, home=damaged_home)
    assert r.returncode == 1
    line = one_error_line(r)
    assert "model-00001.safetensors" in line
    assert "llamadesk rm smollm2-135m-instruct:source" in line or "re-import" in line


@pytest.mark.e2e
def test_ctrl_c_during_a_reply_exits_130_in_one_line(default_home):
    import signal

    env = dict(os.environ, LLAMADESK_HOME=str(default_home))
    # a reply that runs long whatever the sampling (a sampled story sometimes ended before the signal)
    p = subprocess.Popen([sys.executable, "-m", "app.cli", "ask", "Count from 1 to 1000, separated by commas: 1, 2, 3,",
                          "--temperature", "0", "--max-tokens", "2000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         # a child inherits an ignored SIGINT (Python then installs no handler for
                         # it); a user's terminal delivers Ctrl-C with the default action
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.read(1)  # the reply has started
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert err.decode().strip().splitlines() == ["llamadesk: interrupted"]


# ---------------------------------------------------------------- the CLI people expect
def test_version_and_help_on_every_argument(capsys):
    import argparse

    from app.cli import build_parser, main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("llamadesk ")
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in commands.choices.items()
               for a in sub._actions if not a.help]
    assert missing == []
    pull_help = commands.choices["pull"].format_help()
    assert "smollm2-135m-instruct" in pull_help


# ---------------------------------------------------------------- steps said, colour asked away
@pytest.mark.e2e
def test_long_commands_say_each_step_once_on_stderr_off_a_terminal(tmp_path):
    """import and quantize with stderr a pipe (a log, a CI job): one line per step, no progress
    redrawn (no carriage return, no escape code), nothing on stdout."""
    from tiny_checkpoints import tiny_checkpoint

    folder, _ = tiny_checkpoint(tmp_path)
    home = tmp_path / "home"
    r = llamadesk("import", str(folder), "--name", "tiny", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "\r" not in r.stderr and "\x1b" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "Converting hf" and lines[1].startswith("Installed tiny:source in ")
    assert lines[2:4] == ["Packing tiny:int8", "Packed tiny:int8 (0 MB)"]
    assert lines[4] == "Measuring tiny:int8 against tiny:source" and lines[5].startswith("tiny:int8 against tiny:source")
    assert len(lines) == 6

    r = llamadesk("quantize", "tiny", "--scheme", "INT4", home=home)  # a scheme's name in any case
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "\r" not in r.stderr and "\x1b" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[:2] == ["Packing tiny to int4", "Measuring quality on 2048 tokens of Python's reference text"]
    assert re.fullmatch(r"Packed \d+ weights: SQNR [\d.]+ to [\d.]+ dB \(worst: \S+, relative error [\d.]+\)",
                        lines[2]), lines[2]
    assert lines[-1].startswith("Installed tiny:int4 in ")


def in_a_terminal(*args, home, env: dict) -> str:
    """`llamadesk ARGS` with stdout and stderr on a pseudo-terminal: what a user's terminal gets."""
    import pty

    leader, follower = pty.openpty()
    environment = dict(os.environ, LLAMADESK_HOME=str(home), TERM="xterm-256color", COLUMNS="120", **env)
    environment.pop("FORCE_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, env=environment)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(leader)
    return out.decode("utf-8", "replace")


@pytest.mark.e2e
def test_no_color_means_no_escape_codes_in_a_terminal(tmp_path):
    from tiny_checkpoints import tiny_checkpoint

    folder, _ = tiny_checkpoint(tmp_path)
    home = tmp_path / "home"
    assert llamadesk("import", str(folder), "--name", "tiny", home=home).returncode == 0
    for args in (("plan",), ("list",), ("show", "tiny"), ("rm", "nope")):
        coloured = in_a_terminal(*args, home=home, env={})
        plain = in_a_terminal(*args, home=home, env={"NO_COLOR": "1"})
        assert "tiny" in plain or "nope" in plain
        assert "\x1b" not in plain, (args, plain)
        if args == ("plan",):
            assert "\x1b[" in coloured  # the table's styles: the check above is not vacuous
