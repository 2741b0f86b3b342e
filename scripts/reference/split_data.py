"""Split the shared text into training, validation and held-out parts, whole documents at a time.

Usage::

    python scripts/reference/split_data.py [--data ../shared/data] [--out data/heldout] [--train-out DIR]

Why this shape: the reference MoE model must be judged on text it never saw,
and its experts are expected to specialise by domain, so the held-out text is
whole documents of every domain, and a mixed stream of it moves from domain to
domain the way a serving workload drifts.

The rule (see ``corpus.py`` for what a document is in each source):

* Every source is cut into whole documents: WikiText articles (`` = Title = ``
  headings), ranges of whole consecutive Shakespeare speeches (~16 kB each, the
  corpus names no plays or scenes), Grimm tales (titles from the contents
  page), Sherlock Holmes adventures, chapters of the history book and of the
  surgery manual. Gutenberg headers and licence text are dropped; front and
  back matter (title pages, contents, appendix, index) always trains.
* Per domain, eligible documents are ordered by ``sha256("<salt>|<domain>|<index>|<title>")``
  and taken in that order until their text reaches the wanted share of the
  domain's characters; a document that would overshoot the share by more than
  60% is passed over. Held-out (salt ``heldout``, 7%) is chosen first, then
  validation (salt ``valid``, 3%) from what is left; the rest is training.
  Validation text is used only to stop training early and pick the best step.
* ``data/heldout/<domain>.txt`` holds that domain's held-out documents in
  source order, separated by a blank line. ``all.txt`` visits the domains in
  turn (encyclopedia, drama, fairy tale, detective, history, medicine), one
  whole document each time, until every held-out document has appeared once.
  ``manifest.json`` lists every chosen document and the byte counts.

No randomness, clock or environment is involved: the same input bytes give the
same output bytes (``tests/evaluation/test_heldout_split.py`` checks that).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from corpus import DOMAINS, Document, load_documents

HELDOUT_FRACTION = 0.07  # ~5-10% of the text: enough tokens per domain for a stable perplexity
VALID_FRACTION = 0.03  # only steers early stopping; small so that training keeps most of the text
OVERSHOOT = 1.6  # pass over a document that would take a domain's share beyond 1.6x the wanted size
SOURCE_FILES = ("wikitext-2/valid.txt", "tinyshakespeare.txt", "grimm-tales.txt", "gutenberg-mix.txt")


@dataclass
class Split:
    """Documents of each part, by domain, each list in source order."""

    train: dict[str, list[Document]] = field(default_factory=dict)
    valid: dict[str, list[Document]] = field(default_factory=dict)
    heldout: dict[str, list[Document]] = field(default_factory=dict)


def _rank(salt: str, domain: str, index: int, title: str) -> str:
    return hashlib.sha256(f"{salt}|{domain}|{index}|{title}".encode()).hexdigest()


def pick(docs: list[Document], candidates: list[int], fraction: float, total_chars: int, salt: str) -> list[int]:
    """Indices (into ``docs``) of whole documents whose text makes up about ``fraction`` of ``total_chars``."""
    target = fraction * total_chars
    chosen: list[int] = []
    size = 0
    for i in sorted(candidates, key=lambda i: _rank(salt, docs[i].domain, i, docs[i].title)):
        if size >= target:
            break
        if size + len(docs[i].text) > OVERSHOOT * target:
            continue
        chosen.append(i)
        size += len(docs[i].text)
    return sorted(chosen)


def make_split(data_dir: Path) -> Split:
    """Split every domain of ``data_dir`` into training, validation and held-out documents."""
    split = Split()
    for domain, docs in load_documents(data_dir).items():
        total = sum(len(d.text) for d in docs)
        eligible = [i for i, d in enumerate(docs) if d.eligible]
        held = pick(docs, eligible, HELDOUT_FRACTION, total, "heldout")
        rest = [i for i in eligible if i not in held]
        valid = pick(docs, rest, VALID_FRACTION, total, "valid")
        split.heldout[domain] = [docs[i] for i in held]
        split.valid[domain] = [docs[i] for i in valid]
        split.train[domain] = [d for i, d in enumerate(docs) if i not in held and i not in valid]
    return split


def join(docs: list[Document]) -> str:
    """Documents one after another, a blank line between them."""
    return "\n".join(d.text for d in docs)


def mixed_stream(heldout: dict[str, list[Document]]) -> list[Document]:
    """Held-out documents visiting the domains in turn, one whole document per visit."""
    queues = {d: list(heldout[d]) for d in DOMAINS}
    order: list[Document] = []
    while any(queues.values()):
        for domain in DOMAINS:
            if queues[domain]:
                order.append(queues[domain].pop(0))
    return order


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(split: Split, data_dir: Path) -> dict:
    """What went where, for the model card and for anyone checking the split."""
    domains = {}
    for domain in DOMAINS:
        parts = {"train": split.train[domain], "valid": split.valid[domain], "heldout": split.heldout[domain]}
        domains[domain] = {
            name: {"documents": len(docs), "chars": sum(len(d.text) for d in docs)} for name, docs in parts.items()
        }
        domains[domain]["heldout"]["titles"] = [d.title for d in split.heldout[domain]]
        domains[domain]["valid"]["titles"] = [d.title for d in split.valid[domain]]
    return {
        "rule": "scripts/reference/split_data.py (docstring)",
        "fractions": {"heldout": HELDOUT_FRACTION, "valid": VALID_FRACTION},
        "sources_sha256": {name: _sha256(data_dir / name) for name in SOURCE_FILES},
        "domains": domains,
        "all_txt_order": [f"{d.domain}: {d.title}" for d in mixed_stream(split.heldout)],
    }


def write_heldout(split: Split, data_dir: Path, out_dir: Path) -> list[Path]:
    """Write ``<domain>.txt``, ``all.txt`` and ``manifest.json`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {f"{d}.txt": join(split.heldout[d]) for d in DOMAINS}
    files["all.txt"] = join(mixed_stream(split.heldout))
    files["manifest.json"] = json.dumps(manifest(split, data_dir), indent=1, ensure_ascii=False) + "\n"
    paths = []
    for name, text in files.items():
        path = out_dir / name
        path.write_bytes(text.encode("utf-8"))
        paths.append(path)
    return paths


def write_part(docs: dict[str, list[Document]], out_dir: Path) -> None:
    """Write one part (training or validation) as ``<domain>.txt`` files, for inspection."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for domain, items in docs.items():
        (out_dir / f"{domain}.txt").write_bytes(join(items).encode("utf-8"))


def default_data_dir() -> Path:
    """``../shared/data`` beside the repository, where the project keeps the source text."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = Path(__file__).resolve().parents[2]
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="the shared data directory")
    parser.add_argument("--out", type=Path, default=repo / "data" / "heldout", help="held-out output directory")
    parser.add_argument("--train-out", type=Path, default=None, help="also write train/ and valid/ text here")
    args = parser.parse_args(argv)
    split = make_split(args.data)
    for path in write_heldout(split, args.data, args.out):
        print(f"{path}  {path.stat().st_size:>9,d} bytes")
    if args.train_out is not None:
        write_part(split.train, args.train_out / "train")
        write_part(split.valid, args.train_out / "valid")


if __name__ == "__main__":
    main()
