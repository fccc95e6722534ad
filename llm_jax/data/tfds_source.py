"""TFDS text datasets: reading prepared ArrayRecord data, and preparing it from local files.

Reading goes through `tfds.data_source` (random access into ArrayRecord files, no TensorFlow
at training time). The training split is the one in the spec (default `train`); validation
is the dataset's `validation` split, else its `test` split, else every `1/val_fraction`-th
record of the training split (held out, so the two never overlap).

`prepare` builds a real TFDS dataset (ArrayRecord, `train` and `validation` splits, a
`text` feature) from local files through a `GeneratorBasedBuilder`, with the same document
rules and hash split as the `files:` source.
"""

import os
import pathlib
import re

from llm_jax.data import files
from llm_jax.data.documents import HeldOut, Source
from llm_jax.errors import UserError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PREPARED_VERSION = "1.0.0"


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def parse_spec(spec: str) -> tuple[str, str]:
  """'tfds:c4/en:train[:10%]' -> ('c4/en', 'train[:10%]')."""
  rest = spec.removeprefix("tfds:")
  name, _, split = rest.partition(":")
  if not name:
    raise UserError(f"data.source={spec!r} names no dataset; write "
                    "tfds:<name>[/<config>][:<split>], e.g. tfds:lm1b:train.")
  return name, split or "train"


class TfdsDocuments:
  """The `text_key` feature of a TFDS random-access source, decoded to str."""

  def __init__(self, data_source, text_key: str):
    self._source, self._text_key = data_source, text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    value = self._source[index][self._text_key]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def open_tfds(spec: str, data_dir: str, text_key: str, val_fraction: float) -> Source:
  tfds = _tfds()
  name, split = parse_spec(spec)
  data_dir = os.path.expanduser(data_dir)
  where = data_dir or "TFDS's default data directory (~/tensorflow_datasets)"
  data_dir = data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"TFDS dataset {name!r} is neither known to TFDS nor prepared in {where}; "
                    "check the name or set data.tfds_data_dir to where it was prepared "
                    "(llm-jax data prepare writes one).") from None
  if not builder.is_prepared():
    raise UserError(f"TFDS dataset {name!r} has no prepared data in {where}; prepare it there "
                    "as ArrayRecord (tfds build --file_format=array_record) or set "
                    "data.tfds_data_dir to where it was prepared.")
  if builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
    raise UserError(f"TFDS dataset {name!r} in {where} is stored as "
                    f"{builder.info.file_format.value}, which has no random access; prepare it "
                    "with --file_format=array_record.")
  splits = list(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise UserError(f"TFDS dataset {name!r} has no split {split!r}; use one of {splits}, "
                    f"e.g. data.source=tfds:{name}:{splits[0] if splits else 'train'}.")
  features = list(builder.info.features.keys())
  if text_key not in features:
    raise UserError(f"TFDS dataset {name!r} has no feature {text_key!r}; its features are "
                    f"{features}, so set data.text_key to the text one.")

  def documents(split_name):
    return TfdsDocuments(tfds.data_source(name, split=split_name, data_dir=data_dir,
                                          download=False), text_key)

  train = documents(split)
  validation_split = next((s for s in ("validation", "test") if s in splits and s != split), None)
  description = f"TFDS {name} ({split}) in {where}"
  if validation_split:
    return Source(spec, train, documents(validation_split),
                          f"{description}, validation from its {validation_split!r} split")
  every = max(2, round(1 / val_fraction))  # config validation keeps 0 < val_fraction < 1
  return Source(spec, HeldOut(train, every, held=False),
                        HeldOut(train, every, held=True),
                        f"{description}, validation = every {every}th record")


def prepare(pattern: str, name: str, data_dir: str, text_key: str,
            val_fraction: float) -> Source:
  """Writes local files matching `pattern` as TFDS dataset `name` under `data_dir`."""
  tfds = _tfds()
  if not _NAME.match(name):
    raise UserError(f"--name {name!r} is not a TFDS dataset name; use lowercase letters, "
                    "digits and underscores, starting with a letter.")
  data_dir = os.path.expanduser(data_dir)
  target = pathlib.Path(data_dir) / name
  if target.exists():
    raise UserError(f"{target} already exists; pick another --name or --data_dir (nothing "
                    "was changed).")
  corpus = files.open_files(f"files:{pattern}", val_fraction, text_key=text_key)

  class _LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(_PREPARED_VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=f"Local files {pattern!r}, prepared by llm-jax.",
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(corpus.train),
              "validation": self._generate_examples(corpus.validation)}

    def _generate_examples(self, documents):
      for index in range(len(documents)):
        yield index, {"text": documents[index]}

  _LocalText.name = name
  builder = _LocalText(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return corpus
