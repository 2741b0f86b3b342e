"""Cut the shared text files into whole documents, one domain each.

The reference model's experts should specialise by domain, and its held-out
text must not leak into training, so the unit of every split is a whole
document: a WikiText article, a range of consecutive Shakespeare speeches, a
Grimm tale, a Sherlock Holmes adventure, a chapter of the history or of the
surgery manual. Project Gutenberg licence text and headers are stripped here,
before anything else sees the text.

Documents are marked ``eligible`` when they may be held out; front and back
matter (title pages, contents, appendices, index) is only ever trained on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The six styles, in the order the mixed held-out stream visits them.
DOMAINS: tuple[str, ...] = ("encyclopedia", "drama", "fairy_tale", "detective", "history", "medicine")

# tinyshakespeare carries no play or scene titles, so the drama is cut into
# ranges of whole consecutive speeches of about this many characters: small
# enough that ~7% of the drama is several separate ranges, large enough that
# each range is a long passage of one play.
DRAMA_RANGE_CHARS = 16_000

_WIKI_HEADING = re.compile(r"^ = [^=].* = $")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF TH(?:IS|E) PROJECT GUTENBERG EBOOK,? (?P<title>.+?) ?\*\*\*$")
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF TH(?:IS|E) PROJECT GUTENBERG EBOOK|End of the Project Gutenberg)")
_ADVENTURE = re.compile(r"^(ADVENTURE\s+[IVXL]+\.\s+.+|[IVXL]+\.\s+THE ADVENTURE OF .+)$")
_CHAPTER = re.compile(r"^CHAPTER [IVXL]+$")
_BACK_MATTER = re.compile(r"^(APPENDIX|Transcriber’s Notes)$")
_CONTENTS_ENTRY = re.compile(r"^ {4}(?P<title>[A-Z][^a-z]+?)\s{2,}\d+$")

#: Which Gutenberg book (by the title in its START line) holds which style.
BOOK_DOMAINS: dict[str, str] = {
    "THE ADVENTURES OF SHERLOCK HOLMES": "detective",
    "HISTORY OF THE UNITED STATES": "history",
    "MANUAL OF SURGERY": "medicine",
    "GRIMM'S FAIRY TALES": "fairy_tale",
}


@dataclass(frozen=True)
class Document:
    """One whole document: the unit that goes to training or to held-out text."""

    domain: str
    title: str
    text: str
    eligible: bool = True  # False for front/back matter, which always trains


def read_text(path: Path) -> str:
    """Read a source file as UTF-8 with Unix newlines (grimm-tales.txt has a BOM and CRLF)."""
    return path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")


def tidy_prose(text: str) -> str:
    """Drop trailing spaces and runs of blank lines that Gutenberg layout leaves; one newline at the end."""
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def wikitext_articles(text: str) -> list[Document]:
    """Whole WikiText articles: each runs from its `` = Title = `` heading to the next one, untouched."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _WIKI_HEADING.match(line)]
    docs = []
    for a, b in zip(starts, [*starts[1:], len(lines)], strict=True):
        body = "\n".join(lines[a:b]).rstrip(" \n") + "\n"
        docs.append(Document("encyclopedia", lines[a].strip(" =").strip(), body))
    return docs


def drama_ranges(text: str, target_chars: int = DRAMA_RANGE_CHARS) -> list[Document]:
    """Consecutive whole speeches (blank-line separated) grouped into ranges of about ``target_chars``."""
    speeches = [s.strip("\n") for s in text.split("\n\n") if s.strip()]
    docs: list[Document] = []
    group: list[str] = []
    first = 0
    for i, speech in enumerate(speeches):
        group.append(speech)
        if sum(len(s) for s in group) >= target_chars or i == len(speeches) - 1:
            title = f"speeches {first + 1}-{i + 1}"
            docs.append(Document("drama", title, "\n\n".join(group) + "\n"))
            group, first = [], i + 1
    return docs


def gutenberg_books(text: str) -> Iterator[tuple[str, str]]:
    """Yield ``(title, body)`` for each eBook in a file: the text between START and END lines only.

    Everything outside those markers is header or licence. A body with no END
    marker (the truncated surgery manual) runs to the end of the file. The
    volunteers' credit paragraph ("Produced by ...") that opens a body goes too.
    """
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        match = _GUTENBERG_START.match(lines[i].strip())
        if not match:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not _GUTENBERG_END.match(lines[j].strip()):
            j += 1
        body = tidy_prose("\n".join(lines[i + 1 : j]))
        body = re.sub(r"\A(Produced by|\(Additional editing by)[^\n]*(\n[^\n]+)*\n\n", "", body)
        yield match.group("title"), body
        i = j


def _cut(domain: str, body: str, heading: re.Pattern[str], titles: list[str] | None = None) -> list[Document]:
    """Cut a book body at heading lines into front matter, chapters and back matter."""
    lines = body.split("\n")
    if titles is None:
        starts = [i for i, line in enumerate(lines) if heading.match(line)]
    else:  # Grimm: a tale starts where its contents-page title stands alone on a line
        starts, wanted = [], list(titles)
        for i, line in enumerate(lines):
            if wanted and line == wanted[0] and i > 0 and lines[i - 1] == "":
                starts.append(i)
                wanted.pop(0)
        if wanted:
            raise ValueError(f"{domain}: tale headings not found: {wanted[:3]}")
    back = next((i for i in range(starts[-1], len(lines)) if _BACK_MATTER.match(lines[i])), len(lines))
    docs = [Document(domain, "front matter", "\n".join(lines[: starts[0]]).strip("\n") + "\n", eligible=False)]
    for a, b in zip(starts, [*starts[1:], back], strict=True):
        title = " ".join(lines[a].split())
        if heading is _CHAPTER and titles is None:  # "CHAPTER IV" alone says little: add its subject line
            title += ": " + next((line for line in lines[a + 1 : b] if line.strip()), "").strip().title()
        docs.append(Document(domain, title, "\n".join(lines[a:b]).strip("\n") + "\n"))
    if back < len(lines):
        docs.append(Document(domain, "back matter", "\n".join(lines[back:]).strip("\n") + "\n", eligible=False))
    return docs


def grimm_tale_titles(body: str) -> list[str]:
    """The tale titles, in order, from the book's CONTENTS page."""
    contents = body.split("\nCONTENTS\n", 1)[1].split("\nILLUSTRATIONS\n", 1)[0]
    return [m.group("title").strip() for line in contents.split("\n") if (m := _CONTENTS_ENTRY.match(line))]


def book_documents(title: str, body: str) -> list[Document]:
    """Whole documents of one Gutenberg book, by the way that book marks its parts."""
    domain = BOOK_DOMAINS[title.replace("’", "'")]
    if domain == "fairy_tale":
        return _cut(domain, body, _CHAPTER, titles=grimm_tale_titles(body))
    if domain == "detective":
        return _cut(domain, body, _ADVENTURE)
    return _cut(domain, body, _CHAPTER)


def load_documents(data_dir: Path) -> dict[str, list[Document]]:
    """All documents of the shared data directory, by domain, each domain in source order."""
    by_domain: dict[str, list[Document]] = {d: [] for d in DOMAINS}
    by_domain["encyclopedia"] = wikitext_articles(read_text(data_dir / "wikitext-2" / "valid.txt"))
    by_domain["drama"] = drama_ranges(read_text(data_dir / "tinyshakespeare.txt"))
    for name in ("grimm-tales.txt", "gutenberg-mix.txt"):
        for title, body in gutenberg_books(read_text(data_dir / name)):
            docs = book_documents(title, body)
            by_domain[docs[0].domain].extend(docs)
    return by_domain
