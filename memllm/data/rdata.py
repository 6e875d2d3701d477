"""A small reader for R's serialisation format and lazy-load databases (no R needed).

R packages keep their data sets in ``data/Rdata.rdb`` with an index ``data/Rdata.rdx``: the
index is a gzip-compressed serialised list ``(variables, references, compressed)`` whose
``variables`` maps each object name to ``(offset, length)`` in the ``.rdb``; each record there
is a 4-byte big-endian uncompressed length followed by the compressed serialisation (zlib when
``compressed`` is 1/TRUE; with 2 or 3 a type byte ``Z``/``2``/``X``/``0`` says zlib, bzip2, xz or
none). memllm uses this to read Jane Austen's novels from Debian's ``r-cran-janeaustenr``.

Supported: the binary XDR format (``X\\n``), versions 2 and 3, vectors (logical, integer,
double, complex, character, list, raw), attributes, pairlists, symbols, references,
environments (as dicts) and the common ALTREP classes (compact sequences, wrappers, deferred
strings). Byte-code and external pointers are not (not found in data sets).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memllm.errors import DataError

NA_INTEGER = -(2**31)

# SEXP types
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
# serialisation pseudo-types
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ALTREP_SXP = 242, 241, 238

_ENCODING_UTF8, _ENCODING_LATIN1, _ENCODING_BYTES, _ENCODING_ASCII = 1 << 3, 1 << 2, 1 << 1, 1 << 6


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass
class RVector:
    """An R vector: its values (a list) and attributes (e.g. ``names``)."""

    type: int
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return list(names.values) if isinstance(names, RVector) else None

    def as_dict(self) -> dict[str, Any]:
        names = self.names()
        if names is None:
            raise DataError("R vector has no names")
        return dict(zip(names, self.values, strict=True))


@dataclass
class RPairList:
    """A pairlist / language object: ``(tag, value)`` items."""

    type: int
    items: list[tuple[str | None, Any]]
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class REnvironment:
    frame: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RSpecial:
    kind: str


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def fail(self, message: str) -> DataError:
        return DataError(f"{self.source}: R serialisation: {message} (at byte {self.pos})")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail("truncated data")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            upper, lower = self.int(), self.int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise self.fail(f"only the binary XDR format is supported, got {fmt!r}")
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal R version to read it
        if version == 3:
            n = self.int()
            self.native_encoding = self.take(n).decode("ascii", "replace").lower() or "utf-8"
        elif version != 2:
            raise self.fail(f"unsupported serialisation version {version}")

    def chars(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & _ENCODING_LATIN1:
            return raw.decode("latin-1")
        if levels & (_ENCODING_UTF8 | _ENCODING_ASCII):
            return raw.decode("utf-8", "replace")
        if levels & _ENCODING_BYTES:
            return raw.decode("latin-1")
        try:
            return raw.decode(self.native_encoding)
        except (LookupError, UnicodeDecodeError):
            return raw.decode("utf-8", "replace")

    def attributes(self) -> dict[str, Any]:
        attr = self.item()
        if isinstance(attr, RPairList):
            return {tag or "": value for tag, value in attr.items}
        return {}

    def item(self) -> Any:
        flags = self.int()
        sxp = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sxp == NILVALUE_SXP:
            return None
        if sxp in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, BASENAMESPACE_SXP):
            return RSpecial({242: "emptyenv", 241: "baseenv", 253: "globalenv"}.get(sxp, "base"))
        if sxp in (UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return RSpecial("unbound" if sxp == UNBOUNDVALUE_SXP else "missing")
        if sxp == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self.int()
            if not 0 < index <= len(self.refs):
                raise self.fail(f"bad reference {index}")
            return self.refs[index - 1]
        if sxp in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            if self.int() != 0:
                raise self.fail("bad string vector header")
            names = [self.item() for _ in range(self.int())]
            value = RSpecial(f"{sxp}:{names}")
            self.refs.append(value)
            return value
        if sxp == SYMSXP:
            value = RSymbol(self.item() or "")
            self.refs.append(value)
            return value
        if sxp == ENVSXP:
            self.int()  # locked
            env = REnvironment()
            self.refs.append(env)
            self.item()  # enclosure
            frame = self.item()
            hashtab = self.item()
            self.attributes()
            for part in (frame, hashtab):
                if isinstance(part, RPairList):
                    env.frame.update({t or "": v for t, v in part.items})
                elif isinstance(part, RVector):
                    for bucket in part.values:
                        if isinstance(bucket, RPairList):
                            env.frame.update({t or "": v for t, v in bucket.items})
            return env
        if sxp in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP):
            items: list[tuple[str | None, Any]] = []
            attrs: dict[str, Any] = {}
            while True:  # a pairlist is a chain of cells; read it iteratively
                if has_attr:
                    cell_attrs = self.attributes()
                    if not items:
                        attrs = cell_attrs
                tag = self.item() if has_tag else None
                car = self.item()
                items.append((tag.name if isinstance(tag, RSymbol) else None, car))
                flags = self.int()
                nxt = flags & 0xFF
                if nxt not in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP):
                    self.pos -= 4
                    self.item()  # the chain's end (usually NULL)
                    break
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
            return RPairList(sxp, items, attrs)
        if sxp in (SPECIALSXP, BUILTINSXP):
            return RSpecial(self.take(self.int()).decode("ascii", "replace"))
        if sxp == CHARSXP:
            return self.chars(levels)
        if sxp in (LGLSXP, INTSXP):
            n = self.length()
            raw = struct.unpack(f">{n}i", self.take(4 * n))
            values: list[Any] = [None if v == NA_INTEGER else v for v in raw]
            if sxp == LGLSXP:
                values = [None if v is None else bool(v) for v in values]
            return self._finish(sxp, values, has_attr)
        if sxp == REALSXP:
            n = self.length()
            return self._finish(sxp, list(struct.unpack(f">{n}d", self.take(8 * n))), has_attr)
        if sxp == CPLXSXP:
            n = self.length()
            flat = struct.unpack(f">{2 * n}d", self.take(16 * n))
            values = [complex(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
            return self._finish(sxp, values, has_attr)
        if sxp == STRSXP:
            n = self.length()
            return self._finish(sxp, [self.item() for _ in range(n)], has_attr)
        if sxp in (VECSXP, EXPRSXP):
            n = self.length()
            return self._finish(sxp, [self.item() for _ in range(n)], has_attr)
        if sxp == RAWSXP:
            n = self.length()
            return self._finish(sxp, list(self.take(n)), has_attr)
        if sxp == S4SXP:
            return RVector(sxp, [], self.attributes() if has_attr else {})
        if sxp == ALTREP_SXP:
            return self.altrep()
        raise self.fail(f"unsupported SEXP type {sxp}")

    def _finish(self, sxp: int, values: list[Any], has_attr: bool) -> RVector:
        return RVector(sxp, values, self.attributes() if has_attr else {})

    def altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attrs = self.attributes()
        cls = ""
        if isinstance(info, RPairList) and info.items and isinstance(info.items[0][1], RSymbol):
            cls = info.items[0][1].name
        if cls in ("compact_intseq", "compact_realseq") and isinstance(state, RVector):
            n, start, step = state.values[:3]
            values = [start + i * step for i in range(int(n))]
            if cls == "compact_intseq":
                values = [int(v) for v in values]
            return RVector(INTSXP if cls == "compact_intseq" else REALSXP, values, attrs)
        if cls.startswith("wrap_") and isinstance(state, RVector) and state.values:
            inner = state.values[0]
            if isinstance(inner, RVector):
                return RVector(inner.type, inner.values, attrs or inner.attributes)
            return inner
        if cls == "deferred_string" and isinstance(state, RPairList) and state.items:
            arg = state.items[0][1]
            if isinstance(arg, RVector):
                return RVector(
                    STRSXP, [None if v is None else _r_str(v) for v in arg.values], attrs
                )
        raise self.fail(f"unsupported ALTREP class {cls!r}")


def _r_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def unserialize(data: bytes, source: str = "<bytes>") -> Any:
    """Read one serialised R object (the bytes after any compression)."""
    reader = _Reader(data, source)
    reader.header()
    return reader.item()


def read_rds(path: str | Path) -> Any:
    """Read an ``.rds`` file (gzip, bzip2, xz or uncompressed)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return unserialize(raw, str(path))


def read_lazyload_db(prefix: str | Path) -> dict[str, Any]:
    """All objects of a lazy-load database ``prefix.rdx`` + ``prefix.rdb`` (e.g. ``Rdata``)."""
    prefix = Path(prefix)
    rdx, rdb = prefix.with_suffix(".rdx"), prefix.with_suffix(".rdb")
    for p in (rdx, rdb):
        if not p.is_file():
            raise DataError(f"{p}: file not found")
    index = read_rds(rdx)
    if not isinstance(index, RVector):
        raise DataError(f"{rdx}: not a lazy-load index")
    parts = index.as_dict()
    variables = parts.get("variables")
    compressed = parts.get("compressed")
    level = 1
    if isinstance(compressed, RVector) and compressed.values:
        level = int(compressed.values[0])
    if not isinstance(variables, RVector):
        raise DataError(f"{rdx}: no variables in the lazy-load index")
    blob = rdb.read_bytes()
    out = {}
    for name, where in variables.as_dict().items():
        offset, length = (int(v) for v in where.values[:2])
        out[name] = unserialize(_decompress(blob[offset : offset + length], level, rdb), str(rdb))
    return out


def _decompress(record: bytes, level: int, source: Path) -> bytes:
    if len(record) < 5:
        raise DataError(f"{source}: truncated lazy-load record")
    expected = int.from_bytes(record[:4], "big")
    if level in (2, 3):
        kind, body = record[4:5], record[5:]
        if kind == b"Z":
            data = zlib.decompress(body)
        elif kind == b"2":
            data = bz2.decompress(body)
        elif kind == b"X":
            data = lzma.decompress(body, format=lzma.FORMAT_XZ)
        elif kind == b"0":
            data = body
        else:
            raise DataError(f"{source}: unknown compression type {kind!r}")
    else:
        data = zlib.decompress(record[4:])
    if len(data) != expected:
        raise DataError(f"{source}: record length {len(data)} != declared {expected}")
    return data
