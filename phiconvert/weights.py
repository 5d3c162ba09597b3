"""Read a checkpoint's tensors one at a time, straight from its safetensors files.

Converting a model bigger than memory means never holding all of it: the GGUF writer streams tensors into its
file, the reference model materialises one decoder layer at a time. Both read here with plain file reads, not a
memory map, so the pages of the checkpoint stay in the kernel's page cache and never count as the process's memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiconvert.errors import PhiconvertError

# safetensors dtype -> (numpy dtype its raw elements are read as (bf16 as its 16 raw bits), bytes per element)
DTYPES = {"BF16": (np.int16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}
SLICE_ROWS = 16384  # rows of a large matrix read and upcast at a time (row_slices)


@dataclass(frozen=True)
class Tensor:
    """Where one tensor's bytes lie in a safetensors file (read straight from its header)."""

    name: str
    file: Path
    dtype: str  # safetensors' name: BF16, F16 or F32
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype][1]


def files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, or the folder's single file(s)."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        found = sorted({folder / f for f in json.loads(index_file.read_text())["weight_map"].values()})
    else:
        found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise PhiconvertError(f"no .safetensors weights in {folder}")
    return found


def index(folder: Path) -> dict[str, Tensor]:
    """Name -> location of every tensor in the checkpoint's safetensors files (single file or shards)."""
    tensors = {}
    for file in files(folder):
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise PhiconvertError(f"tensor {name} has dtype {info['dtype']}; expected BF16, F16 or F32")
            offset = 8 + header_size + info["data_offsets"][0]
            tensors[name] = Tensor(name, file, info["dtype"], tuple(info["shape"]), offset)
    return tensors


def read(tensor: Tensor, start: int = 0, count: int | None = None) -> np.ndarray:
    """Raw elements ``start`` .. ``start + count`` of ``tensor`` (flat; bf16 as int16 bits), read from its file."""
    dtype, width = DTYPES[tensor.dtype]
    count = tensor.size - start if count is None else count
    with open(tensor.file, "rb") as f:
        f.seek(tensor.offset + start * width)
        out = np.fromfile(f, dtype=dtype, count=count)
    if out.size != count:
        raise PhiconvertError(f"{tensor.file.name} is truncated: tensor {tensor.name} is incomplete")
    return out


def read_torch(tensor: Tensor, rows: slice | None = None, out=None):
    """``tensor`` (or a range of its rows) as float32 torch: fp32 arithmetic on the exact stored values.

    ``out``, a float32 tensor of the right shape, is filled instead of allocating one: reusing the same buffers
    layer after layer spares the kernel zeroing fresh pages for every layer, half the time of streaming a model.
    """
    import torch

    row = math.prod(tensor.shape[1:])
    first, last = (0, tensor.shape[0]) if rows is None else (rows.start, rows.stop)
    raw = torch.from_numpy(read(tensor, first * row, (last - first) * row))
    if tensor.dtype == "BF16":
        raw = raw.view(torch.bfloat16)
    shape = (last - first, *tensor.shape[1:])
    if out is None:
        return raw.float().reshape(shape)
    return out.copy_(raw.reshape(shape))


def row_slices(tensor: Tensor, rows: int = SLICE_ROWS):
    """``tensor`` as float32 torch, ``rows`` rows at a time (the last slice shorter): a large embedding or LM head
    worked through without ever being whole in float32 (2.3 GiB for Phi-4-mini's 200064 x 3072)."""
    for start in range(0, tensor.shape[0], rows):
        yield read_torch(tensor, slice(start, min(start + rows, tensor.shape[0])))


def slice_count(tensor: Tensor, rows: int = SLICE_ROWS) -> int:
    return math.ceil(tensor.shape[0] / rows)


def read_stored(tensor: Tensor):
    """``tensor`` as torch in its stored dtype (a copy of its bytes, to write elsewhere unchanged)."""
    import torch

    raw = torch.from_numpy(read(tensor))
    return (raw.view(torch.bfloat16) if tensor.dtype == "BF16" else raw).reshape(tensor.shape)


def read_rows(tensor: Tensor, ids: list[int]):
    """Rows ``ids`` of a 2-D tensor (an embedding lookup without loading the embedding), as float32 torch."""
    import torch

    width = tensor.shape[1]
    dtype, itemsize = DTYPES[tensor.dtype]
    out = np.empty((len(ids), width), dtype=dtype)
    with open(tensor.file, "rb") as f:
        for i, row in enumerate(ids):
            f.seek(tensor.offset + row * width * itemsize)
            f.readinto(memoryview(out[i]).cast("B"))
    raw = torch.from_numpy(out)
    return (raw.view(torch.bfloat16) if tensor.dtype == "BF16" else raw).float()
