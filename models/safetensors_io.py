"""Lazy reading of Hugging Face safetensors checkpoints.

The format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets), then raw little-endian data. We parse
the header ourselves and memory-map the data so that a tensor, or one shard of
it, is read only when asked for, and so that bfloat16 works without torch
(numpy gets it from ml_dtypes). A file shorter than its header promises is
reported as truncated, naming the tensor.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, is truncated, or has the wrong shape."""


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header cut off)")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len
        self.size = size
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return sorted(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the whole tensor (no copy yet)."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        if self.data_start + end > self.size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is truncated (needs bytes up to "
                f"{self.data_start + end}, file has {self.size})"
            )
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self.data_start + begin:self.data_start + end]
        return raw.view(dtype).reshape(info["shape"])


class CheckpointReader:
    """All tensors of a model directory: one or several *.safetensors files,
    with or without `model.safetensors.index.json`."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        self.weight_map: dict[str, str] = {}
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.weight_map = dict(json.load(f)["weight_map"])
        else:
            paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
            if not paths:
                raise CheckpointError(f"no *.safetensors files in {model_dir}")
            for path in paths:
                for name in self._file(os.path.basename(path)).keys():
                    self.weight_map[name] = os.path.basename(path)

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            path = os.path.join(self.model_dir, filename)
            if not os.path.exists(path):
                raise CheckpointError(f"checkpoint file {filename} (from the index) is missing in {self.model_dir}")
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map and name in self._file(self.weight_map[name]).header

    def names(self) -> Iterable[str]:
        return sorted(self.weight_map)

    def tensor(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        f = self._file(self.weight_map[name])
        if name not in f.header:
            raise CheckpointError(f"tensor {name!r} is missing from {f.path} (the index lists it there)")
        if expected_shape is not None and f.shape(name) != tuple(expected_shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {f.shape(name)}, expected {tuple(expected_shape)} "
                "from config.json"
            )
        return f.tensor(name)
