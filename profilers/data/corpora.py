"""Real text for calibration and evaluation: Jane Austen, a Wikipedia excerpt, or the user's own files.

Sources (all fetched once into ``$COMPRESS_HOME/data``, no network afterwards):

- ``"austen"``: the six novels of Jane Austen from the Debian package ``r-cran-janeaustenr``
  (``apt-get download`` + unpacking the .deb; no R needed: the R lazy-load DB is read with the stdlib).
- ``"wikipedia"``: about 100 real English Wikipedia articles from the test data of the ``gensim`` wheel
  (``pip download --no-deps gensim==4.4.0``; only the one .xml.bz2 file is kept).
- paths to ``.txt`` files (one document each) or ``.jsonl`` files (a ``"text"`` field per line).

:func:`split_corpus` makes a deterministic calibration / held-out split so evaluation never sees
calibration text.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import importlib.util
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from xml.etree import ElementTree

from plans.errors import CompressError

CORPUS_NAMES = ("austen", "wikipedia")

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_SYSTEM_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_FILE = WIKI_MEMBER.rsplit("/", 1)[1]

_SUBPROCESS_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------------------
# cache locations


def compress_home() -> Path:
    """$COMPRESS_HOME, else $XDG_CACHE_HOME/attention-compressor, else ~/.cache/attention-compressor."""
    if os.environ.get("COMPRESS_HOME"):
        return Path(os.environ["COMPRESS_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attention-compressor"


def default_data_dir() -> Path:
    """Where corpora are fetched to: ``$COMPRESS_HOME/data``."""
    return compress_home() / "data"


# ----------------------------------------------------------------------------------------------------------
# Jane Austen: the R lazy-load database of r-cran-janeaustenr, read with the stdlib


def _r_unzip(b: bytes) -> bytes:
    """A DB block is a 4-byte big-endian length + a zlib stream; the .rdx index is gzip."""
    return gzip.decompress(b) if b[:2] == b"\x1f\x8b" else zlib.decompress(b[4:])


def _r_unserialize(buf: bytes):
    """Minimal R XDR unserializer: enough SEXP types for janeaustenr (character vectors, lists, ints,
    pairlists, symbols, references). Character vectors come back as list[str | None]; objects with
    attributes as (value, {attr: value})."""
    if buf[:2] != b"X\n":
        raise ValueError("not an R XDR serialization (expected 'X\\n' header)")
    pos = [2]
    refs: list = []

    def i32() -> int:
        v = struct.unpack(">i", buf[pos[0]:pos[0] + 4])[0]
        pos[0] += 4
        return v

    def item():
        flags = i32()
        t, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if t in (254, 242):  # NILVALUE_SXP, EMPTYENV
            return None
        if t == 9:  # CHARSXP
            n = i32()
            if n < 0:
                return None  # NA_character_
            s = buf[pos[0]:pos[0] + n].decode("utf-8", "replace")
            pos[0] += n
            return s
        if t in (16, 19):  # STRSXP, VECSXP
            v = [item() for _ in range(i32())]
            a = item() if has_attr else None
            return (v, dict(a)) if a else v
        if t in (10, 13):  # LGLSXP, INTSXP
            n = i32()
            v = list(struct.unpack(f">{n}i", buf[pos[0]:pos[0] + 4 * n]))
            pos[0] += 4 * n
            if has_attr:
                item()
            return v
        if t == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            if has_attr:
                item()
            k = item() if has_tag else None
            car = item()
            cdr = item()
            return [(k, car)] + (cdr or [])
        if t == 1:  # SYMSXP
            s = item()
            refs.append(s)
            return s
        if t == 255:  # REFSXP
            k = flags >> 8 or i32()
            return refs[k - 1]
        raise ValueError(f"unsupported R SEXP type {t}")

    version = i32()
    i32()  # writer R version
    i32()  # minimal reader version
    if version == 3:
        n = i32()  # native encoding name
        pos[0] += n
    return item()


def read_austen(datadir: str | os.PathLike) -> dict[str, str]:
    """The novels in a janeaustenr ``data`` folder (``Rdata.rdb`` + ``Rdata.rdx``): {name: text}.

    Names are janeaustenr's (``emma``, ``mansfieldpark``, ``northangerabbey``, ``persuasion``,
    ``prideprejudice``, ``sensesensibility``). The text keeps the Gutenberg layout: hard-wrapped lines,
    a blank line between paragraphs (see :func:`unwrap_paragraphs`)."""
    datadir = Path(datadir)
    rdb_path, rdx_path = datadir / "Rdata.rdb", datadir / "Rdata.rdx"
    if not rdb_path.is_file() or not rdx_path.is_file():
        raise CompressError(f"{datadir} is not a janeaustenr data folder (needs Rdata.rdb and Rdata.rdx)")
    try:
        rdb = rdb_path.read_bytes()
        idx, names = _r_unserialize(_r_unzip(rdx_path.read_bytes()))
        variables, vnames = dict(zip(names["names"], idx))["variables"]
        out = {}
        for name, (offset, n) in zip(vnames["names"], variables):
            value = _r_unserialize(_r_unzip(rdb[offset:offset + n]))
            if isinstance(value, tuple):  # a character vector with attributes
                value = value[0]
            if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
                out[name] = "\n".join(line or "" for line in value)
    except (ValueError, KeyError, TypeError, struct.error, zlib.error, OSError) as e:
        raise CompressError(f"could not read the R data in {datadir}: {e}") from e
    if not out:
        raise CompressError(f"no character vectors found in {datadir}/Rdata.rdb")
    return out


def unwrap_paragraphs(text: str) -> str:
    """Join hard-wrapped lines: single newlines become spaces, blank lines (paragraph breaks) stay."""
    paragraphs = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    paragraphs = (" ".join(line.strip() for line in p.split("\n") if line.strip()) for p in paragraphs)
    return "\n\n".join(p for p in paragraphs if p)


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ar archive (the .deb container)."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _extract_deb(deb: Path, dest: Path) -> None:
    """``dpkg -x`` when available, else the stdlib (ar + tar.{xz,gz,bz2})."""
    if shutil.which("dpkg"):
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True, capture_output=True,
                       timeout=_SUBPROCESS_TIMEOUT_S)
        return
    members = _ar_members(deb.read_bytes())
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise ValueError(f"{deb.name} has no data.tar member")
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tf:
        tf.extractall(dest, filter="data")


def _offline_hint(what: str) -> str:
    return (f"{what} Check the network (or an apt/pip proxy), or copy the files into the data folder by hand, "
            "or use your own text instead: pass paths to .txt / .jsonl files as the corpus.")


def fetch_austen(dest_dir: str | os.PathLike | None = None) -> Path:
    """Download ``r-cran-janeaustenr`` with ``apt-get download``, unpack it (no R, nothing installed) and copy
    its ``Rdata.rdb`` / ``Rdata.rdx`` to ``dest_dir/janeaustenr``. Returns that folder (for :func:`read_austen`)."""
    dest = Path(dest_dir) if dest_dir is not None else default_data_dir()
    out = dest / "janeaustenr"
    if (out / "Rdata.rdb").is_file() and (out / "Rdata.rdx").is_file():
        return out
    if not shutil.which("apt-get"):
        raise CompressError(_offline_hint(
            f"Fetching Jane Austen needs `apt-get download {AUSTEN_DEB}` (Debian/Ubuntu), and apt-get is not here."))
    with tempfile.TemporaryDirectory(prefix="austen-") as tmp:
        tmp = Path(tmp)
        try:
            r = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, capture_output=True, text=True,
                               timeout=_SUBPROCESS_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CompressError(_offline_hint(f"`apt-get download {AUSTEN_DEB}` failed: {e}.")) from e
        debs = sorted(tmp.glob(f"{AUSTEN_DEB}_*.deb"))
        if r.returncode != 0 or not debs:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise CompressError(_offline_hint(
                f"`apt-get download {AUSTEN_DEB}` failed ({msg[-1] if msg else 'no .deb'}); "
                "if apt says the package is unknown, run `apt-get update` first."))
        root = tmp / "root"
        try:
            _extract_deb(debs[-1], root)
        except (OSError, ValueError, tarfile.TarError, subprocess.SubprocessError) as e:
            raise CompressError(f"could not unpack {debs[-1].name}: {e}") from e
        found = sorted(root.rglob("janeaustenr/data/Rdata.rdb"))
        if not found:
            raise CompressError(f"{debs[-1].name} has no janeaustenr/data/Rdata.rdb")
        staging = dest / f".janeaustenr.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in ("Rdata.rdb", "Rdata.rdx"):
            shutil.copy2(found[0].parent / f, staging / f)
        (staging / "SOURCE.txt").write_text(f"{debs[-1].name}: Jane Austen's novels (public domain), package MIT\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Wikipedia: the enwiki excerpt in gensim's test data


def fetch_wikipedia(dest_dir: str | os.PathLike | None = None) -> Path:
    """Get the enwiki XML excerpt (206 pages, 2016 dump) out of the gensim wheel: an installed gensim if there is
    one, else ``pip download --no-deps gensim==4.4.0``. Copies it to ``dest_dir`` and returns its path."""
    dest = Path(dest_dir) if dest_dir is not None else default_data_dir()
    out = dest / WIKI_FILE
    if out.is_file():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        local = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / WIKI_FILE
        if local.is_file():
            _copy_atomic(local.read_bytes(), out)
            return out
    with tempfile.TemporaryDirectory(prefix="gensim-") as tmp:
        # one fixed wheel whatever this interpreter / platform is: only its test data is used, never its code
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311", "-d", tmp, f"gensim=={GENSIM_VERSION}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CompressError(_offline_hint(f"`pip download gensim=={GENSIM_VERSION}` failed: {e}.")) from e
        archives = sorted(Path(tmp).iterdir())
        if r.returncode != 0 or not archives:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise CompressError(_offline_hint(
                f"`pip download --no-deps gensim=={GENSIM_VERSION}` failed ({msg[-1] if msg else 'nothing saved'})."))
        data = _member_from_archive(archives[0], WIKI_FILE)
        if data is None:
            raise CompressError(f"{archives[0].name} does not contain {WIKI_FILE}")
        _copy_atomic(data, out)
    return out


def _member_from_archive(path: Path, filename: str) -> bytes | None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                if n.endswith("/" + filename):
                    return z.read(n)
        return None
    with tarfile.open(path) as tf:  # an sdist
        for m in tf.getmembers():
            if m.name.endswith("/" + filename) and m.isfile():
                return tf.extractfile(m).read()
    return None


def _copy_atomic(data: bytes, out: Path) -> None:
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, out)


_WIKI_END_SECTIONS = re.compile(
    r"^==+\s*(See also|References|Notes|Footnotes|Citations|Sources|Bibliography|Further reading|"
    r"External links|Notes and references)\s*==+\s*$", re.M | re.I)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_DROP_LINK = re.compile(r"^\s*:?\s*(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?|simple|wikt)\s*:", re.I)


def _drop_file_links(text: str) -> str:
    """Remove [[File:...]] / [[Image:...]] links with bracket matching (captions hold links and stray brackets)."""
    out, pos = [], 0
    for m in re.finditer(r"\[\[\s*(?:File|Image)\s*:", text, flags=re.I):
        if m.start() < pos:
            continue
        depth, i = 0, m.start()
        while i < len(text) - 1:
            two = text[i:i + 2]
            if two == "[[":
                depth += 1
                i += 2
            elif two == "]]":
                depth -= 1
                i += 2
                if depth == 0:
                    break
            elif text[i] == "\n" and text[i:i + 2] == "\n\n":
                break  # unbalanced: stop at the paragraph end
            else:
                i += 1
        out.append(text[pos:m.start()])
        pos = i
    out.append(text[pos:])
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    """Wikitext to plain prose: drop templates, tables, refs, comments, files, categories, headings and the
    closing sections (See also, References, ...); keep link labels and list items' text."""
    text = html.unescape(text)
    m = _WIKI_END_SECTIONS.search(text)
    if m:
        text = text[:m.start()]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(gallery|math|timeline|imagemap|score|syntaxhighlight|source)[^>]*>.*?</\1>", "", text,
                  flags=re.S | re.I)
    for _ in range(20):  # templates, innermost first
        new = re.sub(r"\{\{[^{}]*\}\}", "", text)
        if new == text:
            break
        text = new
    for _ in range(10):  # tables, innermost first
        new = re.sub(r"\{\|(?:(?!\{\|).)*?\|\}", "", text, flags=re.S)
        if new == text:
            break
        text = new

    def link(m: re.Match) -> str:
        inner = m.group(1)
        if _WIKI_DROP_LINK.match(inner):
            return ""
        return inner.split("|")[-1] if "|" in inner else inner

    text = _drop_file_links(text)
    for _ in range(10):  # links, innermost first
        new = _WIKI_LINK.sub(link, text)
        if new == text:
            break
        text = new
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [http://x label] -> label
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>\n]{0,200}>", "", text)  # leftover html tags
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if re.match(r"^=+.*=+$", line):  # heading
            lines.append("")
            continue
        if line.startswith(("{|", "|", "!", "__")) or re.match(r"^(thumb|left|right)\|", line):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by removed templates
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def read_wikipedia(path: str | os.PathLike, min_chars: int = 200) -> dict[str, str]:
    """Articles of a MediaWiki XML export (``.xml`` or ``.xml.bz2``): {title: plain text}. Keeps main-namespace
    pages that are not redirects and whose cleaned text has at least ``min_chars`` characters."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"Wikipedia dump {path} does not exist")
    opener = bz2.open if path.suffix == ".bz2" else open
    out: dict[str, str] = {}
    try:
        with opener(path, "rb") as f:
            for _, el in ElementTree.iterparse(f, events=("end",)):
                if not el.tag.endswith("}page") and el.tag != "page":
                    continue
                title = ns = text = None
                for child in el.iter():
                    tag = child.tag.rsplit("}", 1)[-1]
                    if tag == "title":
                        title = child.text
                    elif tag == "ns":
                        ns = child.text
                    elif tag == "text":
                        text = child.text
                el.clear()
                if ns != "0" or not title or not text or text.lstrip().upper().startswith("#REDIRECT"):
                    continue
                clean = strip_wiki_markup(text)
                if len(clean) >= min_chars:
                    out[title] = clean
    except (ElementTree.ParseError, OSError, EOFError) as e:
        raise CompressError(f"could not read the Wikipedia dump {path}: {e}") from e
    return out


# ----------------------------------------------------------------------------------------------------------
# user files


def read_text_files(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """User documents: a ``.txt`` (or any non-jsonl) file is one document; a ``.jsonl`` file holds one document
    per line in its ``"text"`` field. Returns {name: text}, names ``file.txt`` / ``file.jsonl#<line>``."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise CompressError(f"corpus file {p} does not exist")
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CompressError(f"corpus file {p} is not UTF-8 text: {e}") from e
        if p.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CompressError(f"{p}:{i}: not valid JSON: {e.msg}") from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise CompressError(f'{p}:{i}: each line needs a string field "text"')
                if rec["text"].strip():
                    out[f"{p.name}#{i}"] = rec["text"]
        elif raw.strip():
            out[str(p) if p.name in out else p.name] = raw
    if not out:
        raise CompressError(f"no text in the corpus files {[str(p) for p in paths]}")
    return out


# ----------------------------------------------------------------------------------------------------------
# one entry point


def _austen_dir(data_dir: Path, fetch: bool) -> Path:
    local = data_dir / "janeaustenr"
    if (local / "Rdata.rdb").is_file():
        return local
    if (AUSTEN_SYSTEM_DIR / "Rdata.rdb").is_file():  # r-cran-janeaustenr installed system-wide
        return AUSTEN_SYSTEM_DIR
    if not fetch:
        raise CompressError(f"Jane Austen is not in {local}; fetch it with profilers.data.corpora.fetch_austen()")
    return fetch_austen(data_dir)


def load_documents(name_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
                   data_dir: str | os.PathLike | None = None, fetch: bool = True) -> dict[str, str]:
    """{document name: text} for a corpus name (``"austen"``, ``"wikipedia"``) or file path(s), sorted by name.
    Named corpora are fetched into ``data_dir`` (default ``$COMPRESS_HOME/data``) on first use.
    Austen comes with its hard line wraps joined (paragraphs separated by a blank line)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if isinstance(name_or_paths, (str, os.PathLike)):
        name_or_paths = [name_or_paths]
    docs: dict[str, str] = {}
    for item in name_or_paths:
        key = str(item)
        if key == "austen":
            docs.update({k: unwrap_paragraphs(v) for k, v in read_austen(_austen_dir(data_dir, fetch)).items()})
        elif key == "wikipedia":
            path = data_dir / WIKI_FILE
            if not path.is_file():
                if not fetch:
                    raise CompressError(f"the Wikipedia excerpt is not in {path}; fetch it with "
                                        "profilers.data.corpora.fetch_wikipedia()")
                path = fetch_wikipedia(data_dir)
            docs.update(read_wikipedia(path))
        elif Path(key).exists():
            docs.update(read_text_files([key]))
        else:
            raise CompressError(f"unknown corpus {key!r}: use one of {list(CORPUS_NAMES)} or a path to a "
                                ".txt / .jsonl file")
    return dict(sorted(docs.items()))


def load_corpus(name_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
                data_dir: str | os.PathLike | None = None, fetch: bool = True) -> list[str]:
    """The documents of :func:`load_documents` as a list of texts (sorted by document name)."""
    return list(load_documents(name_or_paths, data_dir, fetch).values())


# ----------------------------------------------------------------------------------------------------------
# held-out split


@dataclass(frozen=True)
class CorpusSplit:
    calibration: list[str]
    heldout: list[str]
    by: str


def _doc_key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8", "replace")).hexdigest()


def split_corpus(docs: Sequence[str], heldout_fraction: float = 0.2, by: str = "auto", seed: int = 0) -> CorpusSplit:
    """Deterministic calibration / held-out split; calibration and evaluation must call it with the same
    arguments so evaluation never sees calibration text.

    - ``by="document"``: whole documents are held out: the ``ceil(fraction * n)`` documents with the smallest
      ``sha256(seed, text)`` (independent of their order; at least one document on each side).
    - ``by="tail"``: the last ``fraction`` of every document (cut at a paragraph or line break) is held out.
    - ``by="auto"``: ``document`` when there are at least 4 documents, else ``tail``.
    """
    docs = [d for d in docs if d.strip()]
    if not 0.0 < heldout_fraction < 1.0:
        raise CompressError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not docs:
        raise CompressError("cannot split an empty corpus")
    if by == "auto":
        by = "document" if len(docs) >= 4 else "tail"
    if by == "document":
        if len(docs) < 2:
            raise CompressError("a by-document split needs at least 2 documents; use by='tail'")
        n_out = min(len(docs) - 1, max(1, math.ceil(heldout_fraction * len(docs) - 1e-9)))
        order = sorted(range(len(docs)), key=lambda i: _doc_key(docs[i], seed))
        out = set(order[:n_out])
        return CorpusSplit([d for i, d in enumerate(docs) if i not in out],
                           [d for i, d in enumerate(docs) if i in out], by)
    if by == "tail":
        cal, held = [], []
        for d in docs:
            cut = int(len(d) * (1.0 - heldout_fraction))
            nl = d.rfind("\n\n", 0, cut)
            if nl < cut * 0.9:
                nl = d.rfind("\n", 0, cut)
            if nl >= cut * 0.9:
                cut = nl
            cal.append(d[:cut].rstrip())
            held.append(d[cut:].lstrip())
        return CorpusSplit(cal, held, by)
    raise CompressError(f"split_corpus: by must be 'auto', 'document' or 'tail', got {by!r}")
