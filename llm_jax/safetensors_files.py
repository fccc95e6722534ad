"""safetensors files, read memory-mapped and written one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, and the raw little-endian data. It is read and written here with
numpy because the safetensors library (0.8) can neither slice bfloat16 tensors into numpy
arrays nor write a file without holding all of its tensors in memory at once.
"""

import json
import math
import pathlib

import ml_dtypes
import numpy as np

from llm_jax.errors import UserError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_BY_CODE = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
_CODE = {np.dtype(v): k for k, v in _BY_CODE.items()}


def read(path: pathlib.Path) -> dict[str, np.ndarray]:
  """{name: a read-only view of the memory-mapped file} (nothing is read until sliced)."""
  try:
    with open(path, "rb") as f:
      length = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(length))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + length)
  except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise UserError(f"{path} is not a readable safetensors file; download or save it "
                    "again.") from None
  arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _BY_CODE:
      raise UserError(f"Tensor {name} in {path.name} is {info['dtype']}; llm-jax imports "
                      "float32, bfloat16 and float16 weights (quantized ones are not).")
    begin, end = info["data_offsets"]
    if end > data.size:
      raise UserError(f"{path} is truncated ({name} ends past the end of the file); download "
                      "or save it again.")
    arrays[name] = data[begin:end].view(_BY_CODE[info["dtype"]]).reshape(info["shape"])
  return arrays


def write(path: pathlib.Path, tensors: list[tuple[str, tuple, np.dtype]], arrays):
  """Writes `tensors` (name, shape, dtype) to `path`, taking their data one array at a time
  from the iterator `arrays`, in the same order."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype in tensors:
    size = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _CODE[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for (name, shape, dtype), array in zip(tensors, arrays):
      assert array.shape == tuple(shape) and array.dtype == dtype, name
      f.write(np.ascontiguousarray(array).tobytes())
