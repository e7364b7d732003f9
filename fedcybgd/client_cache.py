"""A client's frozen copy of the model, on disk, so nothing it holds is ever sent to it twice.

The cache maps each tensor name to the `Holding` it has: (version, form) plus the parts that
encode it, stored as safetensors files. The manifest is rewritten atomically after the files it
names are in place, so a crash leaves either the old or the new cache, never a mix. In deployment
every message starts a fresh process; the cache on disk is what survives between visits.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedcybgd import compression
from fedcybgd.files import write_atomic, write_atomic_with

MANIFEST = "manifest.json"
RUN_PREFIX = "run-"


def run_dir_name(cache_id: str) -> str:
    """The folder of one server run's cache (`cache_id`: the server's run, kept across a resume)."""
    return RUN_PREFIX + safe_dir_name(cache_id)


def safe_dir_name(text: str) -> str:
    """`text` as a folder name: every character but letters, digits, `.`, `_` and `-` made `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


class CacheMissError(RuntimeError):
    """The cache lacks a tensor (or holds another version or form) that this visit needs."""


class CacheCorruptError(RuntimeError):
    """A cache file cannot be read; its entries are dropped, so the node reports it lacks them."""


class CacheWriteError(RuntimeError):
    """The cache cannot be written (disk full, read-only, ...); what it held before stays valid."""


@dataclass(frozen=True, order=True)
class Holding:
    """One tensor at one version in one form: the unit of the cache and of the wire."""

    name: str
    version: int
    form: str

    def encode(self) -> str:
        return f"{self.name}|{self.version}|{self.form}"

    @classmethod
    def decode(cls, text: str) -> Holding:
        name, version, form = text.rsplit("|", 2)
        return cls(name, int(version), form)


def encode_holdings(holdings: list[Holding]) -> str:
    """As a JSON list: never an empty string, which Flower's ConfigRecord cannot size."""
    return json.dumps([h.encode() for h in sorted(holdings)])


def decode_holdings(text: str) -> list[Holding]:
    return [Holding.decode(item) for item in json.loads(text)]


def digest(holdings: list[Holding]) -> str:
    """What a node holds, in 16 hex digits: compared by the server with what it expects."""
    return hashlib.sha256(encode_holdings(holdings).encode()).hexdigest()[:16]


class ClientCache:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._entries = self._read_manifest()  # name -> {"version", "form", "file"}

    def _read_manifest(self) -> dict[str, dict]:
        path = self.dir / MANIFEST
        if not path.exists():
            return {}
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}  # an unreadable cache is an empty cache: the server resends everything
        return {n: e for n, e in entries.items() if (self.dir / e["file"]).exists()}

    def holdings(self) -> list[Holding]:
        return sorted(Holding(n, e["version"], e["form"]) for n, e in self._entries.items())

    def store(self, tensors: dict[Holding, dict[str, torch.Tensor]]) -> None:
        """Add (or replace) tensors in their wire parts; one file per call, then the manifest."""
        if not tensors:
            return
        file = f"t-{uuid.uuid4().hex}.safetensors"
        flat = {f"{h.name}/{part}": t.contiguous() for h, parts in tensors.items() for part, t in parts.items()}
        try:
            write_atomic_with(self.dir / file, lambda tmp: save_file(flat, str(tmp)))
        except OSError as err:
            raise CacheWriteError(f"cannot write {len(tensors)} tensors to the cache in {self.dir}: "
                                  f"{err.strerror or err}") from err
        entries = dict(self._entries)
        for h in tensors:
            entries[h.name] = {"version": h.version, "form": h.form, "file": file}
        self._write_manifest(entries)

    def load(self, needed: list[Holding]) -> dict[str, torch.Tensor]:
        """Decoded fp32 tensors for exactly `needed`; raises CacheMissError for anything else."""
        return {name: encoded.decode() for name, encoded in self.load_encoded(needed).items()}

    def load_encoded(self, needed: list[Holding]) -> dict[str, compression.Encoded]:
        """Exactly `needed`, as they travelled (not decoded); raises CacheMissError for anything else."""
        problems = []
        for h in needed:
            entry = self._entries.get(h.name)
            if entry is None:
                problems.append(f"{h.name} missing")
            elif (entry["version"], entry["form"]) != (h.version, h.form):
                problems.append(f"{h.name} is v{entry['version']} {entry['form']}, need v{h.version} {h.form}")
        if problems:
            raise CacheMissError(f"cache lost or stale ({len(problems)} tensors): " + "; ".join(problems[:3]))
        by_file: dict[str, list[Holding]] = {}
        for h in needed:
            by_file.setdefault(self._entries[h.name]["file"], []).append(h)
        out = {}
        for file, holdings in by_file.items():
            wanted = {h.name: h for h in holdings}
            try:
                parts = _read_parts(self.dir / file, set(wanted))
                for name, h in wanted.items():
                    form = compression.TensorForm.parse(h.form)
                    compression.check_parts(parts[name], form)
                    out[name] = compression.Encoded(form, parts[name])
            except Exception as err:  # safetensors and the form parser raise many types on bad bytes
                self._drop_file(file)
                raise CacheCorruptError(f"cache file {self.dir / file} is unreadable ({type(err).__name__}: "
                                        f"{err}); its tensors are dropped and will be sent again") from err
        return out

    def _drop_file(self, file: str) -> None:
        """Forget every entry stored in `file`: deleted first, so even an unwritable manifest
        no longer counts it (entries whose file is gone are not read back)."""
        (self.dir / file).unlink(missing_ok=True)
        entries = {n: e for n, e in self._entries.items() if e["file"] != file}
        try:
            self._write_manifest(entries)
        except CacheWriteError:
            pass

    def _write_manifest(self, entries: dict[str, dict]) -> None:
        """Make `entries` the cache's manifest atomically; on failure the old one stays."""
        try:
            write_atomic(self.dir / MANIFEST, json.dumps(entries))
        except OSError as err:
            raise CacheWriteError(f"cannot write the cache manifest in {self.dir}: {err.strerror or err}") from err
        self._entries = entries
        used = {e["file"] for e in self._entries.values()}
        for path in self.dir.glob("t-*.safetensors"):
            if path.name not in used:
                path.unlink(missing_ok=True)


def _read_parts(path: Path, names: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The stored parts of `names` in one cache file, by tensor name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name, part = key.rsplit("/", 1)
            if name in names:
                parts.setdefault(name, {})[part] = f.get_tensor(key)
    return parts


# A run cache used this recently may belong to a run still going on this machine (runs side by
# side share the default cache root): pruning it would cost that run's nodes their caches.
IN_USE_SECONDS = 3600.0


def prune_runs(root: Path, current: str, keep: int) -> list[Path]:
    """Delete all but the `keep` (>= 0: NodeConfig checks) most recently used run caches under
    `root`; returns what went.

    Called when a node first meets a run, so a long-lived node holds at most `keep` past runs'
    frozen copies besides the current one (each is a whole model: hundreds of MB for SmolLM2).
    "Recently used" is the newest modification time of a run folder or anything directly in it,
    since a cache writes its manifest there (or in a per-node folder inside it) on every visit.
    A cache used within the last `IN_USE_SECONDS` is never removed, whatever `keep` says.
    """
    if not root.is_dir():
        return []
    past = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(RUN_PREFIX) and d.name != current]
    past.sort(key=_last_used, reverse=True)
    idle_since = time.time() - IN_USE_SECONDS
    removed = [d for d in past[keep:] if _last_used(d) < idle_since]
    for run_dir in removed:
        shutil.rmtree(run_dir, ignore_errors=True)
    return removed


def _last_used(run_dir: Path) -> float:
    try:
        return max([run_dir.stat().st_mtime] + [child.stat().st_mtime for child in run_dir.iterdir()])
    except FileNotFoundError:  # another node of this machine is removing it right now
        return 0.0
