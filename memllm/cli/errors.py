"""How a failed command ends: one line on stderr, and an exit code that tells whose fault it is.

- exit 2, ``memllm <cmd>: error: <what> (<file>)``: something the user can fix. memllm's own
  errors (:class:`memllm.errors.MemllmError`), and the operating system refusing a file (no
  permission, a read-only or full filesystem, a folder where a file should be or the reverse, a
  named file that does not exist), bytes that are not UTF-8, a file that does not parse
  (JSON, YAML, pickle, safetensors).
- exit 1, ``memllm <cmd>: internal error ...``: anything else is a bug in memllm; the line asks
  for a report and ``-v`` prints the traceback.

A missing file counts as the user's only when the user named it (or a folder above it) on the
command line: a file memllm itself expected to find (a temporary checkpoint that vanished) is a
bug, not bad input.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import sys
import traceback
from pathlib import Path

from memllm.errors import MemllmError

# errno → what the user reads; the file follows in parentheses.
OS_REASONS: dict[int, str] = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOTEMPTY: "folder not empty",
    errno.EMFILE: "too many open files",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
    errno.ENOENT: "file not found",
}


def _serialisation_error(err: BaseException) -> str | None:
    """The one-line reason when ``err`` says a file does not parse; None for anything else."""
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at line {err.lineno} ({err.msg})"
    if isinstance(err, pickle.UnpicklingError):
        return f"not a readable pickle ({err})"
    if type(err).__name__ == "SafetensorError":
        return f"not a readable safetensors file ({err})"
    if "yaml" in sys.modules and isinstance(err, sys.modules["yaml"].YAMLError):
        return f"invalid YAML ({getattr(err, 'problem', None) or err})"
    return None


def _user_paths(argv: list[str]) -> set[Path]:
    """Every path the command line could name: plain arguments and ``key=value`` values."""
    paths = set()
    for token in argv:
        for text in (token, token.split("=", 1)[-1]):
            if text and not text.startswith("-"):
                try:
                    paths.add(Path(text).expanduser().resolve())
                except (OSError, RuntimeError, ValueError):
                    continue
    return paths


def named_by_user(filename: str | None, argv: list[str]) -> bool:
    """Whether ``filename`` is a path the user gave, or a folder above one."""
    if not filename:
        return False
    try:
        missing = Path(filename).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return any(p == missing or missing in p.parents for p in _user_paths(argv))


def describe(err: BaseException, argv: list[str]) -> tuple[str, int] | None:
    """``(line, exit code 2)`` for an error the user can fix; None for a bug."""
    if isinstance(err, MemllmError):
        return str(err), 2
    if isinstance(err, UnicodeDecodeError):
        byte = err.object[err.start : err.start + 1].hex()
        return f"an input file is not UTF-8 text (byte 0x{byte} at offset {err.start})", 2
    if isinstance(err, OSError) and err.errno in OS_REASONS:
        if err.errno == errno.ENOENT and not named_by_user(err.filename, argv):
            return None
        reason = OS_REASONS[err.errno]
        if err.errno == errno.EEXIST and err.filename and Path(err.filename).is_file():
            reason = "is a file, not a folder"  # mkdir(exist_ok=True) on a file's path
        where = err.filename or ""
        if err.filename2:
            where = f"{where} -> {err.filename2}"
        return f"{reason} ({where})" if where else reason, 2
    reason = _serialisation_error(err)
    if reason is not None:
        return reason, 2
    return None


def report_error(err: BaseException, command: str, argv: list[str], verbose: bool) -> int:
    """Print the one line for ``err`` (a traceback too for a bug under ``-v``); the exit code."""
    for handler in logging.getLogger().handlers:
        handler.flush()  # log lines first, so that the error line comes last
    known = describe(err, argv)
    if known is not None:
        line, code = known
        print(f"memllm {command}: error: {line}", file=sys.stderr)
        return code
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    hint = "" if verbose else "; rerun with -v for the traceback"
    print(
        f"memllm {command}: internal error: {type(err).__name__}: {message} — this is a bug in "
        f"memllm, please report it with the command line{hint}",
        file=sys.stderr,
    )
    return 1
