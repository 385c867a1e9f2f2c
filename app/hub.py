"""`llamadesk pull` from the Hugging Face Hub: a GGUF by its quant, or a safetensors repo.

    pull hf.co/OWNER/REPO[:QUANT]   the repo's one GGUF whose name carries QUANT (Ollama's form;
                                    no QUANT means Q4_K_M), kept in its own blocks
    pull OWNER/REPO                 a Hugging Face folder: config.json, tokenizer files, *.safetensors

huggingface_hub asks the Hub for the file list and each file's metadata (HEAD /{repo}/resolve/
{commit}/{file}), and its `http_get` fetches the bytes, resuming a cut connection with a Range
request. Its `hf_hub_download` cannot continue across runs (2.4.0 writes each download to a name
unique to the process and deletes it on any error), so the bytes go to a partial file of ours,
`<cache>/hub-downloads/<owner--repo>/<file>@<key>.part`, keyed by the file's ETag and size: the
next pull of the same file asks for the rest (Range: bytes=N-); a file the Hub changed since (a
new ETag) starts over, and its old partial is deleted. The library trusts what arrives, so we
hash each whole file while copying it into a temporary folder: an LFS file's sha256 must be its
X-Linked-Etag (the LFS oid), a small file's git blob sha1 its ETag. Then the folder or the GGUF
goes through app.importer as `llamadesk import` takes it, and the downloads are dropped (the
store holds the model now). A wrong hash deletes both copies; nothing reaches the store.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import store
from .errors import UserError
from .pull import cache_dir

Say = Callable[[str], None]
Progress = Callable[[int, int, str], None]  # (bytes or tensors done, total, what)

DEFAULT_ENDPOINT = "https://huggingface.co"
# the files of a Hugging Face folder the importer reads; anything else in the repo stays there
HF_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_QUANT = re.compile(r"^[a-z0-9_]+$", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_QUANT_IN_NAME = re.compile(r"[-._]((?:i?q\d|bf16|f16|f32)\w*?)(?:-\d{5}-of-\d{5})?\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    """What `pull` was asked for: a repo, and for a GGUF the quant (upper-case, as files name it)."""

    repo: str  # OWNER/REPO as typed
    quant: str | None  # None: a safetensors repo

    @property
    def alias(self) -> str:
        return store.hub_alias(self.repo, self.quant)

    @property
    def store_name(self) -> str:
        """The repo's name lower-cased, with the quant for a GGUF: `llama-3.2-1b-instruct-gguf-q4_k_m`."""
        tail = self.repo.split("/")[1]
        return store.name_from_path(Path(f"{tail}-{self.quant}" if self.quant else tail))


def parse_hub_ref(ref: str) -> HubRef | None:
    """`hf.co/OWNER/REPO[:QUANT]` or `OWNER/REPO` as a HubRef; None for a catalog name.
    Raises UserError for a malformed one."""
    text = ref.strip()
    gguf = text.lower().startswith(store.HUB_PREFIXES)
    if not gguf and "/" not in text:
        return None
    rest = text.split("/", 1)[1] if gguf else text
    repo, colon, quant = rest.partition(":")
    owner, _, name = repo.partition("/")
    if not (owner and name) or "/" in name or not re.fullmatch(r"[\w.-]+", owner + name):
        raise UserError(f"{ref!r} is not a Hub repo: write hf.co/OWNER/REPO[:QUANT] for a GGUF, "
                        f"OWNER/REPO for safetensors")
    if colon and not gguf:
        raise UserError(f"{ref!r}: a quant names a GGUF; write hf.co/{repo}:{quant}")
    if not gguf:
        return HubRef(repo, None)
    quant = (quant or store.HUB_DEFAULT_QUANT).upper()
    if not _QUANT.match(quant):
        raise UserError(f"{quant!r} is not a quant name (e.g. Q4_K_M, Q8_0)")
    if quant.startswith("IQ"):
        raise UserError(f"{quant}: IQ types are not supported (llamadesk keeps Q4_0..Q8_0 and Q2_K..Q6_K "
                        f"blocks); pick another quant of {repo}")
    return HubRef(repo, quant)


def endpoint() -> str:
    """HF_ENDPOINT, read at each pull (the library reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


# ---------------------------------------------------------------- choosing the files
def pick_gguf(files: list[str], ref: HubRef) -> str:
    """The repo's top-level GGUF whose name carries the quant as a whole word (case-insensitive:
    `Q4_K` does not pick `...-Q4_K_M.gguf`); the shortest name if several do."""
    q = re.escape(ref.quant.lower())
    word = re.compile(rf"(?:^|[-._]){q}(?:$|[-.])")
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "/" not in f]
    hits = [f for f in ggufs if word.search(f.lower()[: -len(".gguf")])]
    whole = [f for f in hits if not _SPLIT_GGUF.search(f)]
    if whole:
        return min(whole, key=lambda f: (len(f), f))
    if hits:
        raise UserError(f"{ref.repo}: the {ref.quant} GGUF is split ({hits[0]}, ...); split GGUFs are not "
                        f"supported, pick a quant kept in one file")
    if not ggufs:
        raise UserError(f"{ref.repo} holds no GGUF file; for a safetensors repo write `llamadesk pull {ref.repo}`")
    quants = sorted({q for f in ggufs if (q := _quant_named(f))}) or ggufs
    raise UserError(f"{ref.repo} has no {ref.quant} GGUF (it has: {', '.join(quants)})")


def _quant_named(fname: str) -> str | None:
    """The quant a GGUF's name ends with, upper-case: 'Llama-3.2-1B-Q4_K_M.gguf' -> 'Q4_K_M'."""
    m = _QUANT_IN_NAME.search(fname)
    return m.group(1).upper() if m else None


def pick_hf_folder(files: list[str], ref: HubRef) -> list[str]:
    """config.json, the tokenizer files and the top-level *.safetensors of the repo."""
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith(".safetensors")]
    if not weights:
        hint = (f"; it holds GGUFs: `llamadesk pull hf.co/{ref.repo}`" if any(f.endswith(".gguf") for f in files)
                else " (only safetensors weights are read)")
        raise UserError(f"{ref.repo} has no *.safetensors at its top level{hint}")
    if "config.json" not in top:
        raise UserError(f"{ref.repo} has no config.json: not a Hugging Face model folder")
    return [f for f in top if f in HF_FOLDER_FILES] + weights


# ---------------------------------------------------------------- pull
def pull_from_hub(ref: HubRef, replace: bool = False, say: Say = lambda s: None,
                  progress: Progress = lambda done, total, what: None) -> store.ModelEntry:
    """Fetch `ref` through huggingface_hub, hash-check each file, and import it as
    `ref.store_name:source` with source.hub naming where it came from. Returns the entry;
    UserError (one line, nothing stored) for a gated, private or missing repo, a missing quant,
    no network, too little disk, or a file whose hash is not the Hub's."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    from .importer import import_checkpoint

    name, url = ref.store_name, endpoint()
    _refuse_taken_name(name, ref, replace)
    with _hub_errors(ref, url):
        info = HfApi(endpoint=url).model_info(ref.repo, revision="main")
        files = [s.rfilename for s in info.siblings or []]
        wanted = [pick_gguf(files, ref)] if ref.quant else pick_hf_folder(files, ref)
        commit = info.sha or "main"
        metas = {f: get_hf_file_metadata(hf_hub_url(ref.repo, f, revision=commit, endpoint=url)) for f in wanted}
    total = sum(m.size or 0 for m in metas.values())
    downloads = downloads_dir(ref)
    # the download, our verified copy, and the store's entry of ~its size
    _check_disk_space([downloads, store.models_root()], 3 * total, ref)
    root = store.models_root()
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".pull-") as tmp:
            done = 0
            for f in wanted:
                say(f"Downloading {f} from {url}/{ref.repo} ({(metas[f].size or 0) / 1e6:.0f} MB)")
                with _hub_errors(ref, url):
                    got = download_resumable(hf_hub_url(ref.repo, f, revision=commit, endpoint=url), metas[f],
                                             downloads, f, _bytes_reporter(progress, f"Downloading {f}", done, total))
                copy_verified(got, Path(tmp) / f, metas[f].etag, f"{ref.repo}/{f}")
                done += metas[f].size or 0
            hub = {"alias": ref.alias, "url": f"{url}/{ref.repo}", "repo": ref.repo, "commit": commit, "files": wanted}
            source = Path(tmp) / wanted[0] if ref.quant else Path(tmp)
            entry = import_checkpoint(source, name, replace=replace, hub=hub,
                                      progress=lambda d, t, w: progress(d, t, f"Converting {w}"), say=say)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"nothing was installed; `llamadesk pull {ref.alias}` again continues "
                                f"from what was downloaded") from None
    shutil.rmtree(downloads, ignore_errors=True)
    return entry


# ---------------------------------------------------------------- downloads that outlive a run
def downloads_dir(ref: HubRef) -> Path:
    """Where `ref`'s files download to, kept between runs until its pull succeeds."""
    return cache_dir() / "hub-downloads" / ref.repo.lower().replace("/", "--")


def download_resumable(url: str, meta, folder: Path, fname: str, tqdm_class) -> Path:
    """Download `url` (a file whose HfFileMetadata is `meta`) to `folder/<fname>@<key>`, continuing
    the `.part` file an earlier run left (Range: bytes=<its size>-) when its key, the ETag and
    size, matches; partials of `fname` under another key are deleted first. Returns the complete
    file, unverified (copy_verified checks its hash). UserError while another pull downloads it;
    the library's httpx2 and HfHubHTTPError exceptions pass through (see _hub_errors)."""
    from filelock import FileLock, Timeout
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    key = hashlib.sha256(f"{meta.etag}\0{meta.size}".encode()).hexdigest()[:16]  # the ETag is data: never a path
    done, part = folder / f"{fname}@{key}", folder / f"{fname}@{key}.part"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(folder / f"{fname}.lock", timeout=0)
        lock.acquire()
    except Timeout:
        raise UserError(f"another `llamadesk pull` is downloading {fname} right now; wait for it to end") from None
    try:
        for stale in folder.glob(f"{glob.escape(fname)}@*"):
            if stale not in (done, part):
                stale.unlink(missing_ok=True)
        if done.exists():
            return done
        have = part.stat().st_size if part.exists() else 0
        if meta.size is not None and have > meta.size:  # longer than the file: not a prefix of it
            part.unlink()
            have = 0
        with open(part, "ab") as f:
            http_get(url, f, resume_size=have, headers=build_hf_headers(), expected_size=meta.size,
                     displayed_filename=fname, tqdm_class=tqdm_class)
        part.rename(done)
        return done
    finally:
        lock.release()


def _refuse_taken_name(name: str, ref: HubRef, replace: bool) -> None:
    """Before any download: the store name is free, or holds this very pull (then --force)."""
    have = [e for e in store.list_entries() if e.name == name and e.variant == store.SOURCE]
    if not have or replace:
        return
    alias = have[0].manifest.get("source", {}).get("hub", {}).get("alias")
    if alias == ref.alias:
        raise UserError(f"{ref.alias} is already installed as {name}; `--force` pulls it again")
    raise UserError(f"the store name {name} is taken by {alias or 'an imported model'}; "
                    f"`llamadesk rm {name}` first, or `--force` to replace it")


def copy_verified(src: Path, dst: Path, etag: str | None, what: str) -> None:
    """Copy `src` to `dst`, hashing as it goes: an LFS file (a 64-hex etag) must have that sha256,
    any other the git blob sha1 its etag names. On a mismatch both copies go and UserError says so."""
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {src.stat().st_size}\0".encode())
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            sha256.update(chunk)
            blob.update(chunk)
            fout.write(chunk)
    expected = (etag or "").strip('"').lower()
    got = sha256.hexdigest() if _SHA256.match(expected) else blob.hexdigest()
    if got != expected:
        dst.unlink(missing_ok=True)
        src.resolve().unlink(missing_ok=True)  # the cache's blob: a retry downloads it again
        src.unlink(missing_ok=True)
        raise UserError(f"{what}: the download's hash is {got}, the Hub says {expected or 'nothing'}; "
                        f"it was deleted and nothing was installed")


def _check_disk_space(folders: list[Path], need: int, ref: HubRef) -> None:
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise UserError(f"{ref.alias} needs about {need / 1e9:.1f} GB free under {folder} (its download, "
                            f"a checked copy and the store's entry); {free / 1e9:.1f} GB are free")


def _bytes_reporter(progress: Progress, what: str, before: int, total: int):
    """A tqdm class for huggingface_hub that reports bytes through `progress`, drawing nothing
    itself (the CLI's bar does). A resumed download reuses the same bar, so counts continue."""
    from tqdm import tqdm

    class BytesReporter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.n = kwargs.get("initial", 0)
            progress(before + self.n, total, what)

        def update(self, n=1):
            self.n += n
            progress(before + self.n, total, what)

    return BytesReporter


@contextmanager
def _hub_errors(ref: HubRef, url: str) -> Iterator[None]:
    """The library's exceptions, raised inside, as one UserError line each."""
    import httpx2
    from huggingface_hub import errors

    where = f"{url}/{ref.repo}"
    try:
        yield
    except errors.GatedRepoError:
        raise UserError(f"{where} is gated: accept its terms on the Hub while logged in, then set HF_TOKEN "
                        f"to an access token of that account") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{where}: no such repo (or it is private: set HF_TOKEN to a token that can read it)") from None
    except (errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError) as e:
        raise UserError(f"{where}: a file it lists is missing on the Hub ({_first_line(e)})") from None
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as e:  # after the library's own resumed tries
        raise UserError(f"{where}: the download was cut again and again ({_first_line(e)}); run the pull "
                        f"again: it continues where this one stopped") from None
    except (httpx2.TransportError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        raise UserError(f"cannot reach {url} ({_first_line(e)}); check the network, or HF_ENDPOINT") from None
    except errors.HfHubHTTPError as e:
        raise UserError(f"{where}: the Hub answered {_first_line(e)}") from None
    except OSError as e:
        if "Consistency check failed" not in str(e):  # http_get's words for a download that stayed short
            raise
        raise UserError(f"{where}: the download kept being cut; run the pull again: it continues where this "
                        f"one stopped") from None


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
