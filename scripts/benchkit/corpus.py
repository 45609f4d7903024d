"""Texts to send: English sentences from this machine's license texts and manual pages, and the
descriptions of its installed Debian packages.

All ship with every Debian system, so every benchmark runs offline from a fresh clone. `Texts`
hands them out so that none repeats unless asked: a cache answering a repeated input would
measure the cache, not the model.
"""

from __future__ import annotations

import gzip
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

MAN = Path("/usr/share/man")
DPKG_STATUS = Path("/var/lib/dpkg/status")
LICENSES = Path("/usr/share/common-licenses")
FALLBACK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "A lighthouse keeper climbs the spiral stairs every evening to light the great lamp.",
    "Bread is made from flour, water, salt and yeast, kneaded and left to rise for hours.",
    "The steam engine turns the heat of burning coal into the motion of a piston and wheel.",
    "Bicycles became popular in the late nineteenth century once the safety design appeared.",
    "Rivers carry sediment from the mountains down to the sea, building deltas over centuries.",
    "A good library keeps books, maps and records so that anyone may read and learn from them.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
]
# The man-page data sets of the model benchmarks (precision, batch).
RERANK_CANDIDATES = 10
PASSAGE_CHARS = 400
PROMPT = "Explain in one sentence what the command {name} does: {description}"
WORD = re.compile(r"[a-z][a-z0-9_+-]{2,}")


def split_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """The sentences of `text` with `min_words` to `max_words` words, whitespace collapsed."""
    sentences = (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words]


def license_sentences(limit: int = 4096) -> list[str]:
    """English sentences of 8-40 words from /usr/share/common-licenses (a fixed list where
    that folder is missing)."""
    files = sorted(p for p in LICENSES.glob("*") if p.is_file()) if LICENSES.is_dir() else []
    text = " ".join(p.read_text(errors="ignore") for p in files)
    return split_sentences(text, 8, 40)[:limit] or list(FALLBACK_SENTENCES)


class Texts:
    """Reads on through a pool of texts. Once the whole pool has been handed out, each text
    comes back with its round appended (" [2]"), so no two texts handed out are equal and no
    cache can answer; with `repeat=True` the pool simply cycles."""

    def __init__(self, pool: Sequence[str], start: int = 0, repeat: bool = False) -> None:
        if not pool:
            raise ValueError("an empty pool of texts")
        self.pool, self.cursor, self.repeat = list(pool), start, repeat

    def at(self, index: int) -> str:
        """The text at `index` of the endless sequence."""
        text = self.pool[index % len(self.pool)]
        rounds = index // len(self.pool)
        return text if self.repeat or rounds == 0 else f"{text} [{rounds + 1}]"

    def next(self) -> str:
        self.cursor += 1
        return self.at(self.cursor - 1)

    def take(self, n: int) -> list[str]:
        return [self.next() for _ in range(n)]


# --- manual pages -----------------------------------------------------------------------------
def troff_to_text(source: str) -> tuple[str, str]:
    """(NAME description, body text) of a man page, with troff markup stripped: comments,
    macro definitions (`.de` ... `..`), ignored blocks (`.ig`) and control lines (those that
    start with `.` or `'`) are left out; text lines keep their words."""
    source = re.sub(r"^(?:[.'][ \t]*\\\".*|\\\".*)$", "", source, flags=re.M)  # comments
    source = re.sub(r"^\.(?:de|de1|am|ig)\b.*?^\.\.[ \t]*$", "", source, flags=re.M | re.S)
    source = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", source)
    source = source.replace("\\-", "-").replace("\\&", "").replace("\\(em", "-")
    source = re.sub(r"\\[(,/|^~]", "", source)
    source = re.sub(r"\\\(..|\\\*.|\\.", " ", source)
    name, body, section = "", [], ""
    for line in source.splitlines():
        if line.startswith(".SH") or line.startswith(".SS"):
            section = line[3:].strip().strip('"').upper()
            if section != "NAME":
                body.append("\n" + section.title() + "\n")
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in (".B", ".I", ".BR", ".IR", ".BI", ".IB", ".RB", ".RI") and rest:
                line = rest.replace('"', "")
            else:
                continue
        if section == "NAME":
            name += " " + line
        elif line.strip() and section:  # text before the first heading is preamble
            body.append(line.strip())
    description = name.split(" - ", 1)[1].strip() if " - " in name else ""
    return description, re.sub(r"[ \t]+", " ", " ".join(body)).strip()


def man_corpus(limit: int, max_chars: int) -> list[dict]:
    """Pages of every section; the ~16,000 near-identical gcloud pages only fill up to `limit`
    (as distractors, `labelled: False`), so the labelled queries stay diverse.

    A page installed under several names (CPU_SET.3 and CPU_ZERO.3, readv.2 and writev.2) is
    one page: its later copies are left out. Kept, each copy would be a second right answer
    that a one-answer labelled set scores as wrong (a quarter of the first 2,000 pages here).
    Pages that share their NAME line with another are documents but not queries."""
    pages = sorted(MAN.glob("man[1-8]/*.gz"))
    ordered = [p for p in pages if not p.name.startswith("gcloud")]
    ordered += [p for p in pages if p.name.startswith("gcloud")]
    docs, seen = [], set()
    for path in ordered:
        try:
            with gzip.open(path) as page:
                source = page.read().decode("utf-8", "replace")
        except (OSError, EOFError):  # an unreadable page is skipped, not fatal
            continue
        description, body = troff_to_text(source)
        if len(body) < 300 or len(description.split()) < 3 or body in seen:
            continue
        seen.add(body)
        docs.append(
            {
                "id": path.name.removesuffix(".gz"),
                "text": body[:max_chars],
                "full": body,
                "metadata": {"section": path.parent.name.removeprefix("man")},
                "query": description,
                "labelled": not path.name.startswith("gcloud"),
            }
        )
        if len(docs) == limit:
            break
    # A NAME line that several pages share ("macros for manipulating CPU sets") asks for any
    # of them: those pages stay as documents, not as queries.
    shared = Counter(d["query"] for d in docs)
    for doc in docs:
        doc["labelled"] = doc["labelled"] and shared[doc["query"]] == 1
    return docs


# --- Debian package descriptions ---------------------------------------------------------------
def package_corpus(limit: int, status: Path = DPKG_STATUS) -> list[dict]:
    """The installed packages' descriptions (dpkg's status file), in package-name order: the
    one-line synopsis ("command line tool for transferring data with URL syntax") becomes a
    labelled query and the long description its document. Kept: synopses of 3 words or more,
    long descriptions of 150 characters or more, and only where neither is shared with another
    package (the many "This package contains the shared library" blurbs could not be told
    apart by anyone)."""
    packages = []
    text = status.read_text(errors="replace") if status.exists() else ""
    for stanza in text.split("\n\n"):
        name = re.search(r"^Package: (\S+)", stanza, re.M)
        described = re.search(r"^Description: (.*)\n((?: .*(?:\n|$))*)", stanza, re.M)
        if not name or not described:
            continue
        # Continuation lines start with a space; " ." alone separates paragraphs.
        lines = [line[1:].strip() for line in described.group(2).splitlines()]
        body = " ".join("" if line == "." else line for line in lines)
        packages.append((name.group(1), described.group(1).strip(), " ".join(body.split())))
    synopses = Counter(synopsis.lower() for _, synopsis, _ in packages)
    bodies = Counter(body for _, _, body in packages)
    docs = [
        {
            "id": name,
            "text": body,
            "full": body,
            "metadata": {"source": "dpkg"},
            "query": synopsis,
            "labelled": True,
        }
        for name, synopsis, body in sorted(dict.fromkeys(packages))
        if len(synopsis.split()) >= 3
        and len(body) >= 150
        and synopses[synopsis.lower()] == 1
        and bodies[body] == 1
    ]
    return docs[:limit]


def man_docs(pages: int | None) -> list[dict]:
    """Labelled man pages (`man_corpus`), one per distinct description
    and passage, with `passage`: the first ~PASSAGE_CHARS characters, cut at a space."""
    total = sum(1 for p in MAN.glob("man[1-8]/*.gz") if not p.name.startswith("gcloud"))
    docs, seen = [], set()
    for doc in man_corpus(min(pages or total, total), 10**7):
        if not doc["labelled"]:
            continue
        cut = doc["full"][: PASSAGE_CHARS + 40]
        passage = cut[:PASSAGE_CHARS].rsplit(" ", 1)[0] if len(cut) > PASSAGE_CHARS else cut
        passage = " ".join(re.sub(r"(^|\s)'\s?(t|br)\b", " ", passage).split())
        key = (doc["query"].lower(), passage)
        if doc["query"].lower() in seen or passage in seen:
            continue
        seen.update(key)
        docs.append({**doc, "passage": passage, "name": doc["id"].rsplit(".", 1)[0]})
    return docs


def man_sentences(minimum: int, seed: int = 0, docs: list[dict] | None = None) -> list[str]:
    """Distinct 10-40-word sentences of the labelled man pages (`docs`, else all of them), in a
    fixed shuffle; exits when there are fewer than `minimum`."""
    if docs is None:
        pages = [p for p in MAN.glob("man[1-8]/*.gz") if not p.name.startswith("gcloud")]
        docs = man_corpus(len(pages), 10**7)
    found: dict[str, None] = {}
    for doc in docs:
        if doc.get("labelled", True):
            found.update(dict.fromkeys(split_sentences(doc["full"], 10, 40)))
    pool = list(found)
    if len(pool) < minimum:
        raise SystemExit(f"only {len(pool)} distinct 10-40-word sentences in the man pages read")
    random.Random(seed).shuffle(pool)
    return pool


def rerank_sets(docs: list[dict], queries: list[dict], seed: int) -> list[dict]:
    """Each query with its own page's passage and the 9 passages of other pages that share the
    most rare words with it (IDF-weighted overlap), shuffled."""
    words = [set(WORD.findall(d["passage"].lower())) for d in docs]
    df = Counter(w for ws in words for w in ws)
    idf = {w: math.log(len(docs) / n) for w, n in df.items()}
    rng = random.Random(seed)
    out = []
    for q in queries:
        terms = set(WORD.findall(q["query"].lower()))
        scored = sorted(
            (
                (-sum(idf.get(t, 0.0) for t in terms & ws), i)
                for i, ws in enumerate(words)
                if docs[i]["id"] != q["id"]
            ),
        )
        others = [docs[i]["passage"] for _, i in scored[: RERANK_CANDIDATES - 1]]
        passages = [q["passage"], *others]
        rng.shuffle(passages)
        out.append({"query": q["query"], "passages": passages, "own": passages.index(q["passage"])})
    return out


def build_data(sentences: int, queries: int, prompts: int, seed: int, pages: int | None) -> dict:
    """Sentences to embed, rerank sets and prompts from the man pages, for the model
    benchmarks."""
    docs = man_docs(pages)
    shuffled = docs[:]
    random.Random(seed).shuffle(shuffled)
    usable = [d for d in shuffled if 3 <= len(d["query"].split()) <= 20]
    if len(usable) < queries + prompts:
        raise SystemExit(f"only {len(usable)} man pages with a usable NAME description")
    return {
        "sentences": man_sentences(sentences, seed, docs)[:sentences],
        "rerank": rerank_sets(docs, usable[:queries], seed),
        "prompts": [
            PROMPT.format(name=d["name"], description=d["query"])
            for d in usable[queries : queries + prompts]
        ],
        "pages": len(docs),
    }
