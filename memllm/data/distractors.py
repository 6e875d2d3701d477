"""Long natural text: distractor "haystacks" for BabiLong and the offline pretraining corpus.

Sources (a ``distractor`` / ``source`` string):

``austen``
    Jane Austen's six novels (public domain), from Debian's ``r-cran-janeaustenr``. Fetched once
    by ``memllm data fetch austen``: ``apt-get download r-cran-janeaustenr`` (an ``apt-get
    update`` first when the package lists are missing; needs root), the ``.deb`` is unpacked in
    Python, and ``data/Rdata.rdb`` — R-serialised, zlib-compressed character vectors, one per
    novel — is read with :mod:`memllm.data.rdata` (no R). The novels are written as plain text,
    one paragraph per blank-line-separated block, to ``cache_dir()/data/austen/``.
``kjv``
    The King James Bible (public domain), from Debian's ``bible-kjv`` + ``bible-kjv-text``: its
    compressed data file is decoded by running the package's own ``bible`` program from the
    unpacked ``.deb`` (Linux x86-64), one paragraph per chapter, in ``cache_dir()/data/kjv/``.
a path
    A text file, or a folder of ``*.txt`` files (paragraphs separated by blank lines).
``hf:NAME[:CONFIG]``
    A Hugging Face dataset with a ``text`` field (e.g. ``hf:deepmind/pg19``, the books
    BabiLong uses), streamed; needs ``datasets`` and the hub, imported only then.

Text is split into sentences by a rule-based splitter (sentence-final punctuation followed by a
capital, with the usual abbreviations such as "Mr." and "Mrs." protected) — BabiLong itself uses
NLTK's Punkt, which is not available offline.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memllm.core.backbone import cache_dir
from memllm.errors import DataError

log = logging.getLogger(__name__)

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
BOOK_SOURCES = ("austen", "kjv")


@dataclass(frozen=True)
class Document:
    """One text (a book, a file, a dataset row) as paragraphs."""

    name: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def data_dir() -> Path:
    """Where fetched and built data live: ``memllm.core.backbone.cache_dir() / "data"``."""
    return cache_dir() / "data"


# --------------------------------------------------------------------------------------------
# sentences and paragraphs
# --------------------------------------------------------------------------------------------

_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "sr",
    "jr",
    "col",
    "gen",
    "capt",
    "rev",
    "messrs",
    "mme",
    "mlle",
    "esq",
    "lt",
    "mt",
    "vol",
    "ch",
    "no",
    "viz",
    "vs",
    "etc",
    "cf",
    "prof",
    "sgt",
    "hon",
}
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+")
_NEXT_STARTS = re.compile(r"[\"'“‘(\[]*[A-Z0-9]")
_LAST_WORD = re.compile(r"([A-Za-z]+)\.[\"'”’)\]]*$")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (rule-based; abbreviations like "Mr." do not end one)."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if not _NEXT_STARTS.match(text, end):
            continue
        piece = text[start:end].rstrip()
        word = _LAST_WORD.search(piece)
        if word and (
            word.group(1).lower() in _ABBREVIATIONS
            or (len(word.group(1)) == 1 and word.group(1).isupper())
        ):
            continue
        if piece:
            sentences.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


_ITALICS = re.compile(r"_([^_]+)_")  # Project Gutenberg's _italics_
_HEADING = re.compile(r"^(chapter|volume|book|part)\s+([0-9ivxlc]+|the\s+\w+)\b", re.IGNORECASE)


def lines_to_paragraphs(lines: Sequence[str | None]) -> list[str]:
    """Join wrapped book lines into paragraphs; drop headings, titles and other short labels."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            current.append(line)
            continue
        if current:
            para = " ".join(current)
            current = []
            if _is_heading(para):
                continue
            paragraphs.append(_ITALICS.sub(r"\1", para))
    return paragraphs


def _is_heading(para: str) -> bool:
    if _HEADING.match(para):
        return True
    if not any(c.islower() for c in para):
        return True  # an all-caps title
    return len(para) < 60 and not re.search(r"[.!?\"”]", para)


def read_text_document(path: Path) -> Document:
    """A plain-text file as paragraphs (blocks separated by blank lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    blocks = re.split(r"\n\s*\n", text)
    paragraphs = tuple(" ".join(b.split()) for b in blocks if b.strip())
    return Document(path.stem, paragraphs)


# --------------------------------------------------------------------------------------------
# fetching the offline books
# --------------------------------------------------------------------------------------------


def _apt_download(package: str, folder: Path) -> Path:
    """``apt-get download PACKAGE`` into ``folder`` (after ``apt-get update`` when needed)."""
    if shutil.which("apt-get") is None:
        raise DataError(
            f"apt-get is not available to fetch {package}; download its .deb elsewhere and "
            f"pass it with --deb"
        )

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", package], cwd=folder, capture_output=True, text=True
        )

    result = attempt()
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        log.info("apt-get download %s failed; running apt-get update and retrying", package)
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = attempt()
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        first = (result.stderr or result.stdout).strip().splitlines()
        reason = first[-1] if first else f"exit code {result.returncode}"
        raise DataError(
            f"apt-get download {package} failed: {reason} (run 'apt-get update' as root, or "
            "pass a downloaded .deb with --deb)"
        )
    return debs[-1]


def extract_deb(deb: Path, target: Path) -> Path:
    """Unpack a ``.deb``'s files into ``target`` (pure Python: ar archive + data.tar.*)."""
    raw = Path(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{deb}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            return _extract_with_dpkg(deb, target)
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            tar.extractall(target, filter="data")
        return target
    raise DataError(f"{deb}: no data.tar member")


def _extract_with_dpkg(deb: Path, target: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{deb}: zstd-compressed package and no dpkg-deb to unpack it")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target


def _write_books(folder: Path, books: dict[str, list[str]], source_note: str) -> Path:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, paragraphs in books.items():
        (tmp / f"{name}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    (tmp / "SOURCE.txt").write_text(source_note, encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def austen_from_rdata(rdata_prefix: Path) -> dict[str, list[str]]:
    """The six novels as paragraphs, read from janeaustenr's ``data/Rdata`` lazy-load DB."""
    from memllm.data.rdata import RVector, read_lazyload_db

    objects = read_lazyload_db(rdata_prefix)
    books = {}
    for name in AUSTEN_TITLES:
        vec = objects.get(name)
        if not isinstance(vec, RVector):
            raise DataError(f"{rdata_prefix}.rdb: no character vector {name!r}")
        books[name] = lines_to_paragraphs(vec.values)
    return books


def fetch_austen(*, deb: str | Path | None = None, force: bool = False) -> Path:
    """Fetch Jane Austen's novels into ``data_dir()/austen`` and return that folder."""
    folder = data_dir() / "austen"
    if not force and _complete(folder, AUSTEN_TITLES):
        return folder
    installed = Path("/") / AUSTEN_RDATA
    with tempfile.TemporaryDirectory(prefix="memllm-austen-") as tmp:
        tmp_path = Path(tmp)
        if deb is not None:
            root = extract_deb(Path(deb), tmp_path / "x")
            prefix, origin = root / AUSTEN_RDATA, f"{Path(deb).name}"
        elif installed.with_suffix(".rdb").is_file():
            prefix, origin = installed, f"installed {AUSTEN_PACKAGE} ({installed})"
        else:
            deb_path = _apt_download(AUSTEN_PACKAGE, tmp_path)
            root = extract_deb(deb_path, tmp_path / "x")
            prefix, origin = root / AUSTEN_RDATA, deb_path.name
        books = austen_from_rdata(prefix)
    note = (
        "Jane Austen's six novels (public domain), read from Debian's r-cran-janeaustenr "
        f"({origin}), data/Rdata.rdb, by memllm.data.rdata.\n"
    )
    _write_books(folder, books, note)
    log.info("wrote %d novels to %s", len(books), folder)
    return folder


def fetch_kjv(
    *, deb: str | Path | None = None, text_deb: str | Path | None = None, force: bool = False
) -> Path:
    """Fetch the King James Bible into ``data_dir()/kjv`` (one file per book)."""
    folder = data_dir() / "kjv"
    if not force and folder.is_dir() and len(list(folder.glob("*.txt"))) >= 66:
        return folder
    with tempfile.TemporaryDirectory(prefix="memllm-kjv-") as tmp:
        tmp_path = Path(tmp)
        program_deb = Path(deb) if deb else _apt_download(KJV_PACKAGES[0], tmp_path)
        data_deb = Path(text_deb) if text_deb else _apt_download(KJV_PACKAGES[1], tmp_path)
        root = tmp_path / "x"
        extract_deb(program_deb, root)
        extract_deb(data_deb, root)
        program = root / "usr/bin/bible"
        if not program.is_file() or not (root / "usr/lib/bible.data").is_file():
            raise DataError("bible-kjv packages lack usr/bin/bible or usr/lib/bible.data")
        program.chmod(0o755)
        try:
            result = subprocess.run(
                [str(program), "-f", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
                capture_output=True,
                text=True,
                check=True,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.CalledProcessError) as err:
            raise DataError(f"could not run the bible program from bible-kjv: {err}") from err
        books = kjv_books(result.stdout.splitlines())
    note = "The King James Bible (public domain), from Debian's bible-kjv and bible-kjv-text.\n"
    _write_books(folder, books, note)
    return folder


_VERSE = re.compile(r"^([0-9]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def kjv_books(lines: Sequence[str]) -> dict[str, list[str]]:
    """``Ge1:1 text`` lines → ``{"01_Ge": [chapter paragraph, ...], ...}``."""
    books: dict[str, list[str]] = {}
    order: list[str] = []
    chapter_key, verses = None, []
    for line in [*lines, "End0:0 "]:
        m = _VERSE.match(line.strip())
        if not m:
            if verses and line.strip():
                verses.append(line.strip())
            continue
        book, chapter, _, text = m.groups()
        if (book, chapter) != chapter_key:
            if chapter_key is not None and verses:
                books.setdefault(chapter_key[0], []).append(" ".join(verses))
            chapter_key, verses = (book, chapter), []
            if book not in order and book != "End":
                order.append(book)
        verses.append(text.strip())
    return {f"{i + 1:02d}_{b}": books[b] for i, b in enumerate(order) if b in books}


def fetch(name: str, **kwargs) -> Path:
    """Fetch an offline book source by name (``austen`` or ``kjv``)."""
    if name == "austen":
        return fetch_austen(**kwargs)
    if name == "kjv":
        return fetch_kjv(**kwargs)
    raise DataError(f"unknown data source {name!r} (choose from {', '.join(BOOK_SOURCES)})")


def _complete(folder: Path, names) -> bool:
    return folder.is_dir() and all((folder / f"{n}.txt").is_file() for n in names)


def book_folder(name: str, *, fetch_missing: bool = True) -> Path:
    """The cached folder of a book source, fetched on first use (or a clear error)."""
    folder = data_dir() / name
    if folder.is_dir() and list(folder.glob("*.txt")):
        return folder
    if fetch_missing:
        log.info("fetching the offline text source %r (first use)", name)
        try:
            return fetch(name)
        except DataError as err:
            raise DataError(
                f"the offline text source {name!r} is not fetched ({folder}) and fetching it "
                f"failed: {err}; run: memllm data fetch {name}"
            ) from None
    raise DataError(
        f"the offline text source {name!r} is not fetched yet (looked in {folder}); "
        f"run: memllm data fetch {name}"
    )


# --------------------------------------------------------------------------------------------
# loading documents
# --------------------------------------------------------------------------------------------


def load_documents(
    spec: str, *, split: str = "train", max_documents: int | None = None, text_field: str = "text"
) -> list[Document]:
    """Documents of a text source (see the module docstring for ``spec``).

    ``split`` only matters for ``hf:`` sources (the dataset's split; ``validation`` falls back
    to ``train`` when absent). Local sources are split by the callers.
    """
    if spec in BOOK_SOURCES:
        return _folder_documents(book_folder(spec))
    if spec.startswith("hf:"):
        return _hf_documents(spec[3:], split, max_documents or 20, text_field)
    path = Path(spec).expanduser()
    if path.is_file():
        return [read_text_document(path)]
    if path.is_dir():
        return _folder_documents(path)
    raise DataError(
        f"distractor/corpus source {spec!r}: not a known source ({', '.join(BOOK_SOURCES)}), "
        "an existing file or folder, or hf:NAME"
    )


def _folder_documents(folder: Path) -> list[Document]:
    files = sorted(p for p in folder.rglob("*.txt") if p.name != "SOURCE.txt")
    if not files:
        raise DataError(f"{folder}: no .txt files")
    return [d for d in (read_text_document(p) for p in files) if d.paragraphs]


def _hf_documents(name: str, split: str, limit: int, text_field: str) -> list[Document]:
    try:
        import datasets  # optional: only for hub sources
    except ImportError as err:
        raise DataError(f"hf:{name} needs the datasets package: pip install 'memllm[hub]'") from err
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split, streaming=True)
    except ValueError:
        if split == "train":
            raise
        ds = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    docs = []
    for i, row in enumerate(ds):
        if i >= limit:
            break
        if text_field not in row:
            raise DataError(f"hf:{name} row {i}: no {text_field!r} field")
        paragraphs = tuple(
            " ".join(b.split()) for b in re.split(r"\n\s*\n", row[text_field]) if b.strip()
        )
        docs.append(Document(f"{repo}-{split}-{i}", paragraphs))
    return docs
