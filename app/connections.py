"""Saved connections to OpenAI-compatible servers, and where the user let document passages go.

    history `state` "connections"    [{"name": "nas", "url": "http://nas:8462"}, ...]  never a key
    history `state` "docs_consent"   ["http://nas:8462/v1", ...]  servers that may receive passages
    <config dir>/remote-keys.json     {"nas": "sk-..."}: mode 0600, written whole or not at all

The history is a plain file that exports and backups copy, so a key lives only in the key file
(`store.config_dir()`); the history refuses any value named like a secret anyway.
"""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

from . import store
from .errors import UserError
from .history import History, write_atomic
from .remote import Remote, api_base

KEYS_FILE = "remote-keys.json"
_CONNECTIONS = "connections"
_CONSENT = "docs_consent"


@dataclass(frozen=True)
class Connection:
    name: str
    url: str


def connections(history: History) -> list[Connection]:
    """The saved connections, in the order they were added; rows that cannot be read are skipped."""
    rows = history.state(_CONNECTIONS, [])
    return [Connection(r["name"], r["url"]) for r in (rows if isinstance(rows, list) else [])
            if isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("url"), str)]


def save_connection(history: History, name: str, url: str, key: str = "") -> Connection:
    """Save (or replace) the connection `name`; its key goes to the key file, an empty key removes
    it there. Raises UserError for an empty name or a URL that is not http(s)."""
    name, url, key = " ".join(name.split()), url.strip(), key.strip()
    if not name:
        raise UserError("a connection needs a name")
    api_base(url)  # the URL's shape is checked here; nothing is sent
    kept = [c for c in connections(history) if c.name != name] + [Connection(name, url)]
    _write_keys({**{n: k for n, k in _read_keys().items() if n != name}, **({name: key} if key else {})})
    history.set_state(_CONNECTIONS, [{"name": c.name, "url": c.url} for c in kept])
    return Connection(name, url)


def remove_connection(history: History, name: str) -> None:
    history.set_state(_CONNECTIONS, [{"name": c.name, "url": c.url} for c in connections(history) if c.name != name])
    keys = _read_keys()
    if name in keys:
        del keys[name]
        _write_keys(keys)


def open_connection(history: History, name: str) -> Remote:
    """A client for the saved connection `name`, with its key. Raises UserError if it is not saved."""
    found = [c for c in connections(history) if c.name == name]
    if not found:
        raise UserError(f"no saved connection named {name!r}")
    return Remote.connect(found[0].url, _read_keys().get(name))


# ---------------------------------------------------------------- consent to send passages
def docs_consented(history: History, remote: Remote) -> bool:
    consented = history.state(_CONSENT, [])
    return isinstance(consented, list) and remote.base in consented


def consent_to_docs(history: History, remote: Remote) -> None:
    """Remember that passages of the user's documents may go to `remote` (by its URL)."""
    consented = history.state(_CONSENT, [])
    consented = [u for u in consented if isinstance(u, str)] if isinstance(consented, list) else []
    history.set_state(_CONSENT, [*consented, remote.base] if remote.base not in consented else consented)


# ---------------------------------------------------------------- the key file
def keys_path() -> Path:
    return store.config_dir() / KEYS_FILE


def _read_keys() -> dict[str, str]:
    path = keys_path()
    try:
        mode = path.stat().st_mode
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the saved API keys ({getattr(e, 'strerror', None) or e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{path}: others can read the saved API keys; run chmod 600 {path}")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _write_keys(keys: dict[str, str]) -> None:
    path = keys_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(keys), mode=0o600)


__all__ = ["Connection", "connections", "consent_to_docs", "docs_consented", "keys_path", "open_connection",
           "remove_connection", "save_connection"]
