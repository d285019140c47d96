"""Megatron's indexed dataset format (.bin tokens + .idx index), written and merged with numpy
alone: byte for byte what megatron-core's IndexedDatasetBuilder writes, without importing torch
and megatron-core (5-7 s of a tokenizer run's start-up, measured), and with the index kept in
numpy arrays instead of Python lists."""

# .idx layout (little endian), megatron-core's _IndexWriter, version 1, not multimodal:
#   b"MMIDIDX\x00\x00" | u64 version = 1 | u8 dtype code | u64 S (sequences) | u64 D (documents)
#   | i32 lengths[S] | i64 byte pointers[S] into .bin | i64 document_indices[D]
# document_indices starts at 0 and gains len(lengths) after each document; we write one
# sequence per document (piece), as megatron's preprocess_data does.

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {numpy.dtype(numpy.uint8): 1, numpy.dtype(numpy.int8): 2,
               numpy.dtype(numpy.int16): 3, numpy.dtype(numpy.int32): 4,
               numpy.dtype(numpy.int64): 5, numpy.dtype(numpy.float64): 6,
               numpy.dtype(numpy.float32): 7, numpy.dtype(numpy.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> numpy.dtype:
    """megatron-core's DType.optimal_dtype: uint16 below 65500 ids, else int32."""
    return numpy.dtype(numpy.uint16 if vocab_size < 65500 else numpy.int32)


class IndexedWriter:
    """Streams documents into PREFIX.bin; finalize(idx) writes the index. One sequence per
    document: add(tokens, lengths) appends len(lengths) documents whose tokens lie back to back
    in `tokens`."""

    def __init__(self, bin_path: str | Path, dtype: numpy.dtype) -> None:
        self.dtype = numpy.dtype(dtype)
        self._data = open(bin_path, "wb")
        self._lengths: list[numpy.ndarray] = []

    def add(self, tokens: numpy.ndarray, lengths: numpy.ndarray) -> None:
        self._data.write(numpy.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(numpy.asarray(lengths, dtype=numpy.int32))

    def finalize(self, idx_path: str | Path) -> None:
        self._data.close()
        lengths = (numpy.concatenate(self._lengths) if self._lengths
                   else numpy.zeros(0, numpy.int32))
        write_index(idx_path, self.dtype, lengths, numpy.arange(lengths.size + 1, dtype=numpy.int64))

    def close(self) -> None:
        self._data.close()


def write_index(idx_path: str | Path, dtype: numpy.dtype, lengths: numpy.ndarray,
                document_indices: numpy.ndarray) -> None:
    pointers = numpy.zeros(lengths.size, dtype=numpy.int64)   # byte offset of each sequence
    numpy.cumsum(lengths[:-1].astype(numpy.int64) * numpy.dtype(dtype).itemsize, out=pointers[1:])
    with open(idx_path, "wb") as index:
        index.write(HEADER + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[dtype]))
        index.write(struct.pack("<Q", lengths.size) + struct.pack("<Q", document_indices.size))
        for array in (lengths.astype(numpy.int32), pointers, document_indices.astype(numpy.int64)):
            index.write(array.tobytes(order="C"))


def read_index(idx_path: str | Path) -> tuple[numpy.dtype, numpy.ndarray, numpy.ndarray]:
    """(token dtype, sequence lengths, document indices) of an .idx file."""
    raw = Path(idx_path).read_bytes()
    if raw[:9] != HEADER or struct.unpack_from("<Q", raw, 9)[0] != VERSION:
        raise ValueError(f"{idx_path}: not a megatron indexed-dataset index (version 1)")
    dtype = CODE_DTYPES[raw[17]]
    sequences, documents = struct.unpack_from("<QQ", raw, 18)
    lengths = numpy.frombuffer(raw, numpy.int32, sequences, 34)
    document_indices = numpy.frombuffer(raw, numpy.int64, documents, 34 + 12 * sequences)
    return dtype, lengths, document_indices


def merge(prefixes: list[str], bin_path: str | Path, idx_path: str | Path) -> None:
    """Concatenate indexed datasets in order (what IndexedDatasetBuilder.add_index does)."""
    dtype, lengths, documents = None, [], [numpy.zeros(1, numpy.int64)]
    offset = 0
    with open(bin_path, "wb") as data:
        for prefix in prefixes:
            part_dtype, part_lengths, part_documents = read_index(f"{prefix}.idx")
            if dtype is not None and part_dtype != dtype:
                raise ValueError(f"{prefix}: token dtype {part_dtype} differs from {dtype}")
            dtype = part_dtype
            lengths.append(part_lengths)
            documents.append(part_documents[1:] + offset)
            offset += part_lengths.size
            with open(f"{prefix}.bin", "rb") as part:
                shutil.copyfileobj(part, data, 1 << 24)
    if dtype is None:
        raise ValueError("nothing to merge")
    write_index(idx_path, dtype, numpy.concatenate(lengths), numpy.concatenate(documents))
