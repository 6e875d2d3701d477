"""What memllm guarantees about the folders it writes: a manifest of checksums, atomic
replacement, and never removing a file it did not write.

- **Manifest.** Every checkpoint folder holds ``manifest.json``: the size and sha256 of each file
  memllm wrote into it (tensors, configs, trainer state). :func:`verify_manifest` recomputes them
  on load, so a flipped byte, a truncated file or an edited config is a one-line
  :class:`~memllm.errors.CheckpointError`, not a model that silently loads other numbers.
  Folders of memllm ≤ 0.2 have no manifest and load unverified.
- **Atomic replacement.** A checkpoint is written into a sibling folder, each file fsynced, then
  swapped with the old one in one ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel
  lacks it), and the parent folder fsynced: a reader or a crash sees the old checkpoint or the
  new one, never a mix.
- **Ownership.** A folder is replaced only when it is empty or a memllm checkpoint; what memllm
  removes from it is exactly what its manifest lists (or, for an old checkpoint, the file names
  memllm writes). Anything else the user put there is moved into the new folder untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from memllm.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# Files a checkpoint of memllm ≤ 0.2 (no manifest) may hold, written by memllm: the weights and
# their configs, the legacy LoRA files, and the trainer's state (plus rng/ and plug-in weights).
KNOWN_FILES = frozenset(
    {
        "memory_config.json",
        "memory.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter.safetensors",
        "lora_config.json",
        "trainer.pt",
        "state.json",
        MANIFEST_FILE,
    }
)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


# -- files on disk ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory``, as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink()
    )


# -- the manifest -----------------------------------------------------------------------------


def write_manifest(directory: str | os.PathLike, files: list[str] | None = None) -> dict:
    """Write ``manifest.json``: size and sha256 of ``files`` (default: every file in the folder
    but the manifest), each fsynced first. Returns the manifest."""
    directory = Path(directory)
    names = [n for n in (files if files is not None else _files(directory)) if n != MANIFEST_FILE]
    entries = {}
    for name in names:
        path = directory / name
        fsync_path(path)
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": MANIFEST_FORMAT, "files": entries}
    write_synced(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed manifest (None: the folder has none)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt manifest (not valid JSON)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
    ):
        raise CheckpointError(f"{path}: corrupt manifest (no 'files' with sha256 entries)")
    return manifest


def verify_manifest(directory: str | os.PathLike, only: list[str] | None = None) -> bool:
    """Check each file the manifest lists (or the listed ones among ``only``) against its size
    and sha256. Returns False when there is no manifest (an older checkpoint), True when every
    file matches; raises a one-line :class:`CheckpointError` naming the first file that does not.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    for name, entry in manifest["files"].items():
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry.get("bytes", size):
            raise CheckpointError(
                f"{path}: {size} bytes, {entry['bytes']} when saved (truncated or changed)"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 differs from {MANIFEST_FILE} (corrupted or edited after saving)"
            )
    return True


# -- which folders memllm may replace ---------------------------------------------------------


def _is_memllm_checkpoint(directory: Path) -> bool:
    if (directory / MANIFEST_FILE).is_file():
        return True
    # memllm ≤ 0.2: its own file names (a bare PEFT adapter folder is the user's, not ours)
    names = {"memory_config.json", "lora_config.json", "adapter.safetensors", "state.json"}
    if any((directory / n).is_file() for n in names):
        return True
    adapter = directory / "adapter_model.safetensors"
    if adapter.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(adapter), framework="pt") as f:
                return "memllm_version" in (f.metadata() or {})
        except Exception:  # an unreadable file: not provably ours
            return False
    return False


def owned_files(directory: Path) -> set[str]:
    """The files of checkpoint folder ``directory`` that memllm wrote (and may remove)."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        manifest = None  # a corrupt manifest: fall back to the names memllm writes
    if manifest is not None:
        return set(manifest["files"]) | {MANIFEST_FILE}
    return {
        n
        for n in _files(directory)
        if n in KNOWN_FILES or n.startswith("rng/") or ("/" not in n and n.endswith(".safetensors"))
    }


def check_replaceable(target: Path) -> None:
    """Refuse to write a checkpoint over anything but nothing, an empty folder or a checkpoint."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"{target}: exists and is not a folder; choose another path")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not _is_memllm_checkpoint(target):
        found = sorted(p.name for p in target.iterdir())
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise CheckpointError(
            f"{target}: folder holds files that are not a memllm checkpoint ({shown}); "
            "refusing to replace it: save into a new or empty folder"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(tmp: Path, target: Path) -> None:
    """Make the finished folder ``tmp`` the checkpoint at ``target``, atomically.

    ``target`` (if any) must have passed :func:`check_replaceable`. Files in it that memllm did
    not write are moved into the new folder first; the old checkpoint's own files are removed
    after the swap.
    """
    tmp, target = Path(tmp), Path(target)
    if target.is_dir():
        owned = owned_files(target)
        for name in _files(target):
            if name not in owned and not (tmp / name).exists():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                os.rename(target / name, tmp / name)
        if _exchange(tmp, target):
            old = tmp  # the swap left the old checkpoint at tmp's name
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_path(target.parent)


def sibling_tmp(target: Path, tag: str = "tmp") -> Path:
    """A fresh, empty folder beside ``target`` (same filesystem, so the final rename is atomic)."""
    tmp = target.with_name(f".{target.name}.{tag}-{os.getpid()}")
    if tmp.exists():  # a leftover of this pid's own crash: memllm's, safe to remove
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
