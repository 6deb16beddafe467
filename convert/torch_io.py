"""Reading `.pth` files safely and cheaply.

`torch.load(weights_only=True)` refuses pickles that would run code; `mmap=True`
maps tensor data instead of reading it, so tensors are paged in one at a time as
the converter touches them, and handed back to the OS after use.
"""
import ctypes
import hashlib
import mmap
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
from tqdm import tqdm


class ConversionError(ValueError):
  """A `.pth` file that cannot be converted; the message says why."""


def sha256(path, chunk=1 << 24) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f, tqdm(total=os.path.getsize(path), unit='B', unit_scale=True,
                                    desc='sha256', leave=False) as bar:
    while block := f.read(chunk):
      digest.update(block)
      bar.update(len(block))
  return digest.hexdigest()


def load_state_dict(path):
  """Loads a `.pth` with weights_only=True (memory-mapped when the format allows).

  Returns (state_dict, wrapper, mapped): wrapper names the outer key that held
  the tensors ('module', 'state_dict' or None for a plain state dict; other
  top-level entries such as mmseg's 'meta' are dropped); mapped says whether the
  tensors are memory-mapped from the file (only then may `release` be used).
  """
  import torch  # only the converter needs torch
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  mapped = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be mapped
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mapped)
  except pickle.UnpicklingError as e:
    raise ConversionError(
        f'{path}: refused to load: the file is not a plain tensor checkpoint '
        f'(weights_only loading rejected it, it may try to run code).\n{e}') from None
  except Exception as e:  # a corrupt or foreign file fails in many ways (IndexError, ...)
    raise ConversionError(
        f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from None
  wrapper = None
  for key in ('module', 'state_dict'):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj, wrapper = obj[key], key
      break
  if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
    raise ConversionError(f'{path}: expected a state dict (name -> tensor), got {type(obj).__name__}')
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f'{path}: entries that are not tensors: {bad[:10]}')
  return obj, wrapper, mapped


def to_numpy(tensor) -> np.ndarray:
  """A numpy view of a CPU tensor; bf16 through a raw int16 view (numpy has no bf16)."""
  import torch
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


_libc = None


def release(tensor) -> None:
  """Drops the pages of a memory-mapped tensor from this process (they are
  re-read from the file if touched again), so resident memory stays small.
  Only for tensors of a state dict that `load_state_dict` reported as mapped."""
  global _libc
  if _libc is None:
    _libc = ctypes.CDLL(None, use_errno=True)
  nbytes = tensor.untyped_storage().nbytes()
  start = tensor.untyped_storage().data_ptr()
  page = mmap.PAGESIZE
  lo = -(-start // page) * page
  hi = (start + nbytes) // page * page
  if hi > lo:
    _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
