"""`llamadesk pull` from the Hugging Face Hub, against a stand-in of the Hub's file API on 127.0.0.1.

The stand-in answers the calls the pinned huggingface_hub makes: GET /api/models/{repo}/revision/main
(the file list and commit), HEAD and GET /{repo}/resolve/{commit}/{file} with X-Repo-Commit,
ETag, X-Linked-Etag (an LFS file's sha256), X-Linked-Size and Range, and the Hub's error headers
(X-Error-Code: GatedRepo, RepoNotFound). It can send LFS files' bytes to a second stand-in, as
the Hub sends them to its CDN (a 302 to another origin), cut a file's first download half-way,
stop serving a file past a byte for good (the network gone) or stall there (a user's Ctrl+C
comes in the middle), or lie about a hash or a size.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest

from app import cli, pull, store
from app import hub as hub_module
from app.errors import UserError
from app.hub import HubRef, parse_hub_ref, pick_gguf
from tiny_checkpoints import tiny_hf_model, write_hf, write_random_blocks_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS = (".gguf", ".safetensors")


class StandInHub(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.cut_once: set[str] = set()  # files whose first GET stops half-way
        self.cut_always: set[str] = set()  # files whose every GET does
        self.stop_at: dict[str, int] = {}  # files no GET serves past this byte: each ends there, cut
        self.stall: threading.Event | None = None  # set: at stop_at a GET waits for it instead of ending
        self.wrong_etag: set[str] = set()
        self.size_claim: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.cdn: StandInHub | None = None  # set: LFS files' bytes are there, behind a 302 as the Hub's CDN

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def downloads(self, fname: str) -> list[str | None]:
        """The Range header of each GET of `fname` (None: from the start)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + fname)]


class _Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def _answer(self, body: bool):
        hub = self.server
        hub.requests.append((self.command, self.path, self.headers.get("Range")))
        hub.authorizations.append(self.headers.get("Authorization"))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/main(\?.*)?", self.path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/(?:resolve|cdn)/([^/]+)/(.+)", self.path)
        asked = (api or resolve).group(1).lower() if (api or resolve) else None
        repo = next((r for r in hub.repos if r.lower() == asked), None)  # the Hub's repo ids ignore case
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", body)
        if repo in hub.gated:
            return self._error(403, "GatedRepo", f"Access to model {repo} is restricted", body)
        files = hub.repos[repo]
        if api:
            data = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}).encode()
            return self._send(200, {"Content-Type": "application/json"}, data if body else b"", len(data))
        fname = resolve.group(3)
        if fname not in files:
            return self._error(404, "EntryNotFound", f"{fname} does not exist", body)
        content = files[fname]
        headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes",
                   "ETag": '"%s"' % hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()}
        if fname.endswith(LFS):
            oid = hashlib.sha256(content + (b"x" if fname in hub.wrong_etag else b"")).hexdigest()
            headers.update({"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(hub.size_claim.get(fname, len(content)))})
            if hub.cdn is not None and "/resolve/" in self.path:
                headers["Location"] = f"{hub.cdn.url}/{repo}/cdn/{COMMIT}/{fname}"
                return self._send(302, headers, b"", 0)
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        part = content[start:]
        if body and fname in hub.stop_at:
            self._send(206 if start else 200, headers, content[start:hub.stop_at[fname]], len(part))
            if hub.stall is not None:
                hub.stall.wait(60)
            self.close_connection = True
            return
        if body and (fname in hub.cut_once or fname in hub.cut_always):
            hub.cut_once.discard(fname)
            self._send(206 if start else 200, headers, part[: len(part) // 2], len(part))
            self.close_connection = True  # the client sees the body end early
            return
        self._send(206 if start else 200, headers, part if body else b"", len(part))

    def _error(self, status: int, code: str, message: str, body: bool):
        data = json.dumps({"error": message}).encode()
        self._send(status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
                   data if body else b"", len(data))

    def _send(self, status: int, headers: dict, data: bytes, length: int):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file of the machine's user
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    machine_cache = pull.cache_dir()
    monkeypatch.setenv("LLAMADESK_CACHE", str(tmp_path / "cache"))  # the Hub's downloads land here
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(machine_cache / "kernels", target_is_directory=True)  # built once
    yield server
    server.shutdown()
    server.server_close()


def gguf_repo(tmp_path: Path) -> dict[str, bytes]:
    """A GGUF repo as people publish them: one file per quant, a README, an IQ file."""
    q4k = write_random_blocks_gguf(tmp_path / "q4k.gguf", "Q4_K", seed=1).read_bytes()
    q8 = write_random_blocks_gguf(tmp_path / "q8.gguf", "Q8_0", seed=2).read_bytes()
    return {"README.md": b"# Tiny\n", "Tiny-Q4_K_M.gguf": q4k, "Tiny-Q8_0.gguf": q8,
            "Tiny-IQ4_XS.gguf": b"not read", "Tiny-Q4_K_S.gguf": b"not read either"}


def hf_repo(tmp_path: Path) -> dict[str, bytes]:
    folder = write_hf(tiny_hf_model(), tmp_path / "hf")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.00.pth").write_bytes(b"Meta's copy, not read")
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def store_is_empty() -> bool:
    root = store.models_root()
    return store.list_entries() == [] and not any(root.glob(".*")) if root.exists() else True


def one_error_line(capsys) -> str:
    """The error: one line, the last on stderr (after the steps said before it)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert errors == err[-1:] and err[-1].startswith("llamadesk: error: "), err
    return err[-1]


# ---------------------------------------------------------------- GGUF repos
def test_pull_picks_the_default_quant_resumes_a_cut_and_answers(hub, tmp_path, capsys, monkeypatch):
    hub.repos["TestOrg/Tiny-GGUF"] = files = gguf_repo(tmp_path)
    hub.cut_once.add("Tiny-Q4_K_M.gguf")
    # the library keeps what it received in whole chunks (10 MB); a small chunk lets a small file resume
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)

    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 0

    # the cut download went on from the last whole chunk, with a Range request, and nothing else was fetched
    kept = len(files["Tiny-Q4_K_M.gguf"]) // 2 // (1 << 16) * (1 << 16)
    assert kept > 0 and hub.downloads("Tiny-Q4_K_M.gguf") == [None, f"bytes={kept}-"]
    assert [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p and "Q4_K_M" not in p] == []
    (entry,) = store.list_entries()
    assert entry.ref == "tiny-gguf-q4_k_m:source"
    assert entry.manifest["source"]["hub"]["alias"] == "hf.co/testorg/tiny-gguf:q4_k_m"
    assert entry.manifest["source"]["hub"]["files"] == ["Tiny-Q4_K_M.gguf"]
    assert entry.manifest["quant"]["layout"]["layers.0.attention.wq"]["scheme"] == "q4_k"
    assert not (tmp_path / "cache" / "hub-downloads" / "testorg--tiny-gguf").exists()  # the store holds it now
    capsys.readouterr()

    # the alias names it, in any case, with or without the quant
    for alias in ("hf.co/TestOrg/Tiny-GGUF:Q4_K_M", "hf.co/testorg/tiny-gguf"):
        assert cli.main(["ask", "--model", alias, "--temperature", "0", "--max-tokens", "4", "Hello"]) == 0
        assert capsys.readouterr().out.strip()


def test_pull_takes_a_named_quant_in_any_case(hub, tmp_path, capsys):
    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF:q8_0"]) == 0
    (entry,) = store.list_entries()
    assert entry.name == "tiny-gguf-q8_0"
    assert entry.manifest["quant"]["layout"]["layers.0.attention.wq"]["scheme"] == "q8_0"
    assert store.find("hf.co/testorg/tiny-gguf:Q8_0").ref == entry.ref
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("gguf (hf.co/testorg/tiny-gguf:q8_0)")


def test_a_wrong_hash_is_deleted_and_nothing_is_stored(hub, tmp_path, capsys):
    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    hub.wrong_etag.add("Tiny-Q4_K_M.gguf")
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    line = one_error_line(capsys)
    assert "Tiny-Q4_K_M.gguf: the download's hash is" in line and "nothing was installed" in line
    assert store_is_empty()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size > 1000]


@pytest.mark.parametrize("ref, expected", [
    ("hf.co/TestOrg/Tiny-GGUF:Q5_K_M", "has no Q5_K_M GGUF (it has: IQ4_XS, Q4_K_M, Q4_K_S, Q8_0)"),
    ("hf.co/TestOrg/Tiny-GGUF:IQ4_XS", "IQ types are not supported"),
    ("hf.co/TestOrg/Split-GGUF", "the Q4_K_M GGUF is split"),
    ("hf.co/TestOrg/Nope", "no such repo"),
    ("hf.co/TestOrg/Gated", "is gated: accept its terms on the Hub while logged in, then set HF_TOKEN"),
    ("TestOrg/Tiny-GGUF", "has no *.safetensors at its top level; it holds GGUFs: `llamadesk pull hf.co/TestOrg/Tiny-GGUF`"),
])
def test_what_cannot_be_pulled_is_one_line_and_nothing_stored(hub, tmp_path, capsys, ref, expected):
    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    hub.repos["TestOrg/Split-GGUF"] = {"Big-Q4_K_M-00001-of-00002.gguf": b"a", "Big-Q4_K_M-00002-of-00002.gguf": b"b"}
    hub.repos["TestOrg/Gated"] = {"Tiny-Q4_K_M.gguf": b"secret"}
    hub.gated.add("TestOrg/Gated")
    assert cli.main(["pull", ref]) == 1
    assert expected in one_error_line(capsys)
    assert store_is_empty()
    assert [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p] == []


def test_a_download_cut_every_time_is_one_line_and_nothing_stored(hub, tmp_path, capsys):
    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    hub.cut_always.add("Tiny-Q4_K_M.gguf")
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    line = one_error_line(capsys)
    assert "Tiny-GGUF: the download was cut again and again (peer closed connection" in line
    assert line.endswith("run the pull again: it continues where this one stopped")
    assert len(hub.downloads("Tiny-Q4_K_M.gguf")) == 6  # the library's first try and its 5 resumptions
    assert store_is_empty()


# ---------------------------------------------------------------- a pull that died, and the next one
KEPT = 3 << 16  # three whole chunks of 64 KiB: what the library has written when the bytes stop there
# SIGINT as a terminal's foreground process has it: a test run started in the background (`cmd &`,
# nohup) passes its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
# (seen: the pull went on through Ctrl+C). SIGUSR1 prints every thread's stack if it ever hangs.
SUBPROCESS_CHUNKS = "import faulthandler, signal, sys, huggingface_hub.constants as c; " \
                    "signal.signal(signal.SIGINT, signal.default_int_handler); " \
                    "faulthandler.register(signal.SIGUSR1); c.DOWNLOAD_CHUNK_SIZE = 1 << 16; " \
                    "from app.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def small_chunks(monkeypatch):
    # the library writes what it receives in whole chunks (10 MB): small ones let a small file stop part-way
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)


def partials(tmp_path: Path) -> dict[str, int]:
    """The partial downloads a pull left, by name: their sizes."""
    return {p.name: p.stat().st_size for p in (tmp_path / "cache" / "hub-downloads").rglob("*.part")}


def test_a_pull_cut_for_good_continues_in_the_next_run(hub, tmp_path, capsys, small_chunks, assembled):
    hub.repos["TestOrg/Tiny-GGUF"] = files = gguf_repo(tmp_path)
    hub.stop_at["Tiny-Q4_K_M.gguf"] = KEPT  # the network goes for good after KEPT bytes
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    assert "run the pull again: it continues where this one stopped" in one_error_line(capsys)
    assert store_is_empty()
    assert hub.downloads("Tiny-Q4_K_M.gguf") == [None] + [f"bytes={KEPT}-"] * 5
    assert list(partials(tmp_path).values()) == [KEPT]

    del hub.stop_at["Tiny-Q4_K_M.gguf"]
    hub.requests.clear()
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 0
    assert hub.downloads("Tiny-Q4_K_M.gguf") == [f"bytes={KEPT}-"]  # only the rest
    assert assembled == [files["Tiny-Q4_K_M.gguf"]]  # the two runs' bytes, joined in order
    (entry,) = store.list_entries()
    assert entry.ref == "tiny-gguf-q4_k_m:source"
    assert not (tmp_path / "cache" / "hub-downloads" / "testorg--tiny-gguf").exists()


@pytest.fixture
def assembled(monkeypatch) -> list[bytes]:
    """The whole downloads the pull hands to its hash check, in order."""
    seen, check = [], hub_module.copy_verified

    def record(src, *args):
        seen.append(Path(src).read_bytes())
        return check(src, *args)

    monkeypatch.setattr(hub_module, "copy_verified", record)
    return seen


def test_a_partial_download_of_another_version_is_not_reused(hub, tmp_path, capsys, small_chunks, assembled):
    hub.repos["TestOrg/Tiny-GGUF"] = files = gguf_repo(tmp_path)
    hub.stop_at["Tiny-Q4_K_M.gguf"] = KEPT
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    (old_partial,) = partials(tmp_path)

    # the repo's file changed in between (a new upload: another LFS oid and ETag)
    newer = write_random_blocks_gguf(tmp_path / "newer.gguf", "Q4_K", seed=3).read_bytes()
    assert len(newer) == len(files["Tiny-Q4_K_M.gguf"]) and newer[KEPT:] != files["Tiny-Q4_K_M.gguf"][KEPT:]
    files["Tiny-Q4_K_M.gguf"] = newer
    del hub.stop_at["Tiny-Q4_K_M.gguf"]
    hub.requests.clear()
    capsys.readouterr()
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 0
    assert hub.downloads("Tiny-Q4_K_M.gguf") == [None]  # from the start, not bytes=KEPT-
    assert assembled == [newer]
    assert partials(tmp_path) == {} and not list((tmp_path / "cache").rglob(old_partial))


def test_a_pull_continues_from_the_hubs_cdn_and_the_token_stays_on_the_hub(hub, tmp_path, capsys, small_chunks,
                                                                           assembled, monkeypatch):
    """The Hub answers an LFS file's resolve with a 302 to its CDN (another origin): the Range of
    the next run goes there too, and HF_TOKEN is sent to the Hub only."""
    cdn = StandInHub()
    threading.Thread(target=cdn.serve_forever, daemon=True).start()
    try:
        hub.repos["TestOrg/Tiny-GGUF"] = files = gguf_repo(tmp_path)
        hub.cdn, cdn.repos = cdn, hub.repos
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        cdn.stop_at["Tiny-Q4_K_M.gguf"] = KEPT
        assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
        assert "continues where this one stopped" in one_error_line(capsys)
        del cdn.stop_at["Tiny-Q4_K_M.gguf"]
        cdn.requests.clear()
        assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 0
    finally:
        cdn.shutdown()
        cdn.server_close()
    assert cdn.downloads("Tiny-Q4_K_M.gguf") == [f"bytes={KEPT}-"]
    assert assembled == [files["Tiny-Q4_K_M.gguf"]]
    assert set(hub.authorizations) == {"Bearer hf_test_token"} and set(cdn.authorizations) == {None}


def test_a_second_pull_of_a_file_being_downloaded_is_one_line(hub, tmp_path, capsys):
    from filelock import FileLock

    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    folder = tmp_path / "cache" / "hub-downloads" / "testorg--tiny-gguf"
    folder.mkdir(parents=True)
    with FileLock(folder / "Tiny-Q4_K_M.gguf.lock"):  # what the first pull holds while it appends
        assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    assert "another `llamadesk pull` is downloading Tiny-Q4_K_M.gguf right now" in one_error_line(capsys)
    assert hub.downloads("Tiny-Q4_K_M.gguf") == [] and store_is_empty()


def test_ctrl_c_during_a_pull_is_one_line_stores_nothing_and_the_next_run_continues(hub, tmp_path, small_chunks,
                                                                                    assembled):
    hub.repos["TestOrg/Tiny-GGUF"] = files = gguf_repo(tmp_path)
    hub.stop_at["Tiny-Q4_K_M.gguf"], hub.stall = KEPT, threading.Event()  # the bytes stop coming; no error yet
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    run1 = subprocess.Popen([sys.executable, "-c", SUBPROCESS_CHUNKS, "pull", "hf.co/TestOrg/Tiny-GGUF"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while list(partials(tmp_path).values()) != [KEPT] and time.monotonic() < deadline and run1.poll() is None:
            time.sleep(0.05)
        assert list(partials(tmp_path).values()) == [KEPT], (run1.poll(), partials(tmp_path))
        run1.send_signal(signal.SIGINT)  # what Ctrl+C sends the terminal's foreground process
        try:
            out, err = run1.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say what it was doing (seen once in a loaded CI run)
            run1.send_signal(signal.SIGUSR1)
            time.sleep(1)
            run1.kill()
            out, err = run1.communicate()
            pytest.fail(f"the pull went on 60 s after Ctrl+C; stderr: {err[-3000:]}")
    finally:
        hub.stall.set()
        run1.kill()
    assert run1.returncode == 130
    assert err.strip().splitlines()[-1] == ("llamadesk: interrupted; nothing was installed; `llamadesk pull "
                                            "hf.co/testorg/tiny-gguf:q4_k_m` again continues from what was downloaded")
    assert "Traceback" not in err and store_is_empty()
    assert list(partials(tmp_path).values()) == [KEPT]

    hub.stall, hub.requests[:] = None, []
    del hub.stop_at["Tiny-Q4_K_M.gguf"]
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 0
    assert hub.downloads("Tiny-Q4_K_M.gguf") == [f"bytes={KEPT}-"]
    assert assembled == [files["Tiny-Q4_K_M.gguf"]]
    assert [e.ref for e in store.list_entries()] == ["tiny-gguf-q4_k_m:source"]


def test_too_little_disk_is_said_before_any_download(hub, tmp_path, capsys):
    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    hub.size_claim["Tiny-Q4_K_M.gguf"] = 10**17  # 100 PB: more than any disk here
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    assert "needs about 300000000.0 GB free" in one_error_line(capsys)
    assert hub.downloads("Tiny-Q4_K_M.gguf") == [] and store_is_empty()


def test_an_unreachable_hub_is_one_line(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # port 9 on loopback refuses every connection
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF"]) == 1
    assert "cannot reach http://127.0.0.1:9" in one_error_line(capsys)
    assert store_is_empty()


# ---------------------------------------------------------------- safetensors repos
def test_pull_a_safetensors_repo_imports_it_ready_to_chat(hub, tmp_path, capsys):
    hub.repos["TestOrg/Tiny-Llama"] = files = hf_repo(tmp_path)
    assert cli.main(["pull", "TestOrg/Tiny-Llama"]) == 0
    assert [e.ref for e in store.list_entries()] == ["tiny-llama:int8", "tiny-llama:source"]
    source = store.find("hf.co/testorg/tiny-llama")
    hub_info = source.manifest["source"]["hub"]
    assert hub_info["alias"] == "hf.co/testorg/tiny-llama" and hub_info["commit"] == COMMIT
    assert set(hub_info["files"]) == {f for f in files if "/" not in f}  # never original/consolidated.00.pth
    assert "perplexity" in capsys.readouterr().err  # the import's quality line
    assert cli.main(["ask", "--model", "hf.co/TestOrg/Tiny-Llama", "--temperature", "0", "--max-tokens", "4", "Hi"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_pulled_name_is_not_pulled_twice(hub, tmp_path, capsys):
    hub.repos["TestOrg/Tiny-GGUF"] = gguf_repo(tmp_path)
    assert cli.main(["pull", "hf.co/TestOrg/Tiny-GGUF:Q8_0"]) == 0
    capsys.readouterr()
    assert cli.main(["pull", "hf.co/testorg/tiny-gguf:q8_0"]) == 1
    assert "already installed as tiny-gguf-q8_0; `--force` pulls it again" in one_error_line(capsys)
    assert cli.main(["pull", "--force", "hf.co/testorg/tiny-gguf:q8_0"]) == 0


# ---------------------------------------------------------------- names
def test_refs_and_store_names():
    assert parse_hub_ref("smollm2-135m-instruct") is None  # a catalog name
    assert parse_hub_ref("hf.co/Org/Repo-GGUF") == HubRef("Org/Repo-GGUF", "Q4_K_M")
    assert parse_hub_ref("huggingface.co/Org/Repo-GGUF:q6_k") == HubRef("Org/Repo-GGUF", "Q6_K")
    assert parse_hub_ref("Org/Repo").store_name == "repo"
    assert HubRef("Org/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M").store_name == "llama-3.2-1b-instruct-gguf-q4_k_m"
    for bad in ("hf.co/Org", "Org/Repo:Q4_K_M", "hf.co/Org/Repo/x", "hf.co/Org/Repo:Q4 K"):
        with pytest.raises(UserError):
            parse_hub_ref(bad)


def test_a_quant_is_matched_as_a_whole_word():
    files = ["M-Q4_K_M.gguf", "M-Q4_K_S.gguf", "M.Q4_0.gguf", "M-Q4_K.gguf", "sub/M-Q8_0.gguf", "M-IQ4_XS.gguf"]
    assert pick_gguf(files, HubRef("O/M", "Q4_K")) == "M-Q4_K.gguf"
    assert pick_gguf(files, HubRef("O/M", "Q4_K_M")) == "M-Q4_K_M.gguf"
    assert pick_gguf(files, HubRef("O/M", "Q4_0")) == "M.Q4_0.gguf"
    with pytest.raises(UserError, match="has no Q8_0 GGUF"):
        pick_gguf(files, HubRef("O/M", "Q8_0"))  # not at the top level
