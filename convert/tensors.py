"""One small interface over the weights formats the converter reads.

A `TensorSource` maps tensor names to their shape and dtype without reading any
data; `read(name)` returns one tensor as a numpy array in its own dtype (bf16 as
`ml_dtypes.bfloat16`); `release(name)` hands its memory back once it is written.
The rest of the converter sees only this, so a `.pth` (convert/torch_io.py) and
Hugging Face safetensors (convert/safetensors_io.py) go through the same code,
tensor by tensor, with memory near one block.

Names are those of the InternViT `.pth` files (`blocks.3.attn.qkv.weight`);
a source in another layout renames its tensors and `describe(name)` gives the
name in the file, for messages.
"""
import dataclasses
import hashlib

import numpy as np



@dataclasses.dataclass(frozen=True)
class TensorInfo:
  shape: tuple[int, ...]
  dtype: np.dtype


class TensorSource:
  """Base class: `path` (named in messages), `tensors` (name -> TensorInfo),
  `files` (the files read, for their SHA-256) and `meta` (what info.json says
  about the source: format, wrapper, ...)."""

  def __init__(self, path: str, tensors: dict[str, TensorInfo], files: list[str], meta: dict,
               hints: dict | None = None):
    self.path = path
    self.tensors = tensors
    self.files = files
    self.meta = meta
    self.hints = hints or {}  # architecture facts the file states (e.g. heads from config.json)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name].shape

  def read(self, name: str) -> np.ndarray:
    raise NotImplementedError

  def release(self, name: str) -> None:
    """Drops the memory behind a tensor that was read (no-op by default)."""

  def describe(self, name: str) -> str:
    """The tensor's name in the file (for messages)."""
    return name

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def file_sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def looks_like_safetensors(path: str) -> bool:
  """A safetensors file starts with an 8-byte header length and a JSON object."""
  if path.endswith('.safetensors'):
    return True
  with open(path, 'rb') as f:
    head = f.read(9)
  return len(head) == 9 and head[8:9] == b'{'
