"""Reading `.pth` files safely and cheaply (a `TensorSource`).

`torch.load(weights_only=True)` refuses pickles that would run code; `mmap=True`
maps tensor data instead of reading it, so tensors are paged in one at a time as
the converter touches them, and handed back to the OS after use.

Layouts taken as they are: a plain state dict, the original's release format
`{'module': state_dict}` (tools/release.py) and mmcv checkpoints
`{'meta', 'state_dict', 'optimizer'}` (mmcv/runner/checkpoint.py save_checkpoint),
whose `meta` holds numpy scalars (hook_msgs.best_score is a numpy.float64 when
`save_best` is on). For those, exactly numpy's scalar and dtype reconstruction
is allowed in the weights_only unpickler, nothing more.
"""
import ctypes
import mmap
import pickle
import re
import zipfile

import ml_dtypes
import numpy as np

from convert.tensors import TensorInfo, TensorSource
# Also importable as convert.torch_io.ConversionError (older imports).
from internseg_jax.errors import ConversionError  # noqa: F401

# Numeric numpy dtypes whose instances a numpy scalar pickle rebuilds (the BUILD
# step runs the dtype's own __setstate__); no object, string or void dtypes.
_NUMERIC_DTYPES = ('Bool', 'Int8', 'UInt8', 'Int16', 'UInt16', 'Int32', 'UInt32', 'Int64',
                   'UInt64', 'Float16', 'Float32', 'Float64', 'LongDouble', 'Complex64',
                   'Complex128', 'CLongDouble')


def numpy_scalar_globals() -> list:
  """What a pickled numpy scalar needs: `scalar` under its numpy 1.x name (the
  original's files) and its numpy 2.x name, `numpy.dtype`, and the concrete
  numeric dtype classes. Not `_reconstruct` (arrays) nor anything else."""
  scalar = np._core.multiarray.scalar
  classes = [getattr(np.dtypes, f'{name}DType') for name in _NUMERIC_DTYPES]
  return [(scalar, 'numpy.core.multiarray.scalar'), scalar, np.dtype, *classes]


def _refusal(path, error: Exception) -> ConversionError:
  """One line: what weights_only refused, without torch's advice to turn it off."""
  text = str(error)
  found = re.search(r'GLOBAL (\S+)', text) or re.search(r'unrecognized function (.+?)(\n|$)', text)
  what = found.group(1) if found else text.strip().splitlines()[-1][:200]
  return ConversionError(
      f'{path}: refused to load: it holds a Python object that is not a tensor, a '
      f'container or a numpy scalar ({what}); loading it could run code')


def load_state_dict(path):
  """Loads a `.pth` with weights_only=True (memory-mapped when the format allows).

  Returns (state_dict, wrapper, mapped): wrapper names the outer key that held
  the tensors ('module', 'state_dict' or None for a plain state dict; other
  top-level entries such as mmcv's 'meta' and 'optimizer' are dropped); mapped
  says whether the tensors are memory-mapped from the file (only then may
  `release` be used).
  """
  import torch  # only the .pth path needs torch
  mapped = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be mapped
  try:
    with torch.serialization.safe_globals(numpy_scalar_globals()):
      obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mapped)
  except pickle.UnpicklingError as e:
    raise _refusal(path, e) from None
  except Exception as e:  # a corrupt or foreign file fails in many ways (IndexError, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise ConversionError(
        f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first[:200]})') from None
  wrapper = None
  for key in ('module', 'state_dict'):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj, wrapper = obj[key], key
      break
  if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
    raise ConversionError(
        f'{path}: expected a state dict (name -> tensor), got {type(obj).__name__}')
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f'{path}: entries that are not tensors: {bad[:10]}')
  return obj, wrapper, mapped


def numpy_dtype(torch_dtype) -> np.dtype:
  import torch
  if torch_dtype == torch.bfloat16:
    return np.dtype(ml_dtypes.bfloat16)
  return torch.empty(0, dtype=torch_dtype).numpy().dtype


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


class PthSource(TensorSource):
  """A `.pth` file's tensors, memory-mapped where the format allows."""

  def __init__(self, path: str):
    self.state_dict, wrapper, self.mapped = load_state_dict(path)
    tensors = {k: TensorInfo(tuple(v.shape), numpy_dtype(v.dtype))
               for k, v in self.state_dict.items()}
    super().__init__(path, tensors, files=[path], meta=dict(format='pth', wrapper=wrapper))

  def read(self, name: str) -> np.ndarray:
    return to_numpy(self.state_dict[name])

  def release(self, name: str) -> None:
    if self.mapped:
      release(self.state_dict[name])

  def close(self) -> None:
    self.state_dict = {}
