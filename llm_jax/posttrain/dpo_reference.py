"""DPO's reference: the `train.init_from` model's log-probabilities of every preference pair,
computed once before training in a sharded, batched pass and kept with the run.

They are saved as `reference_log_probs.npz` in the workdir with a key of the reference
checkpoint and the data (the pairs' text, the tokenizer and the context length). A resumed
run reuses them; if the data or the reference changed, they are computed again (and the log
says why), never silently reused. The reference parameters are freed before the policy's are
loaded, so training holds one model.
"""

import hashlib
import io
import json
import pathlib
import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax.parallel import checkpoint, sharding
from llm_jax import config as config_lib, paths
from llm_jax.data import preferences
from llm_jax.data.documents import Subset
from llm_jax.data.batches import BatchSource
from llm_jax.posttrain.pairs import pair_batch_source, preference_pairs
from llm_jax.posttrain.records import Records
from llm_jax.parallel.distributed import is_primary, log
from llm_jax.errors import UserError
from llm_jax.objectives.dpo import dpo_objective
from llm_jax.objectives.pairs import sequence_log_probs

CACHE = "reference_log_probs.npz"
_BATCHES_ENCODED = 16
SPLITS = ("train", "validation")


def dpo_batches(config, workdir, inherited_tokenizer: bytes | None = None) -> BatchSource:
  """Pair batches with each pair's reference log-probabilities (`ref_chosen_log_prob`,
  `ref_rejected_log_prob`)."""
  pairs = preference_pairs(config, workdir, inherited_tokenizer)
  reference = reference_log_probs(config, pathlib.Path(workdir), pairs)

  def extra(split):
    def arrays(index: int) -> dict[str, np.ndarray]:
      chosen, rejected = reference[split][index]
      return {"ref_chosen_log_prob": np.float32(chosen),
              "ref_rejected_log_prob": np.float32(rejected)}
    return arrays
  return pair_batch_source(config, pairs, extra("train"), extra("validation"))


def _read_cache(path: pathlib.Path, key: str) -> dict[str, np.ndarray] | None:
  """The cached log-probabilities if `path` holds them for `key`, else None (and why)."""
  if not path.exists():
    return None
  try:
    with np.load(path) as saved:
      if str(saved["key"]) == key:
        return {split: saved[split] for split in SPLITS}
    log(f"{path} belongs to other pairs or another reference; computing it again")
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    log(f"{path} cannot be read; computing it again")
  return None


def _key(config, pairs: Records, location: str) -> str:
  digest = hashlib.blake2b(digest_size=16)
  digest.update(pairs.tokenizer.to_bytes())
  for split in SPLITS:
    documents = getattr(pairs, split)
    for index in range(len(documents)):
      digest.update(json.dumps(documents[index], sort_keys=True).encode())
    digest.update(split.encode())
  return json.dumps({"reference": location, "context_length": config.model.context_length,
                     "data": digest.hexdigest()})


def reference_log_probs(config, workdir: pathlib.Path, pairs: Records
                        ) -> dict[str, np.ndarray]:
  """{split: [pairs, 2] float32 summed log-probabilities of (chosen, rejected)}, from the cache
  in `workdir` when its key matches, else computed with the reference and saved.

  The reference is the checkpoint the run started from, as its config.json pins it once
  written (not a newer checkpoint the `init_from` run saved since).
  """
  saved_config = workdir / "config.json"
  init_from = (config_lib.from_json(saved_config.read_text()).train.init_from
               if saved_config.exists() else config.train.init_from)
  init = checkpoint.open_init_source(init_from, log)
  key = _key(config, pairs, init.location)
  path = workdir / CACHE
  cached = _read_cache(path, key)
  if jax.process_count() > 1:  # every process reuses, or every process computes
    reuse = bool(multihost_utils.broadcast_one_to_all(np.int32(cached is not None)))
    if reuse and cached is None:
      raise UserError(f"Process {jax.process_index()} cannot read {path}, which process 0 "
                      "reuses; give every process the same --workdir (a shared file system).")
    cached = cached if reuse else None
  if cached is not None:
    log(f"Reference log-probabilities of {init.location} reused from {path}")
    return cached
  mesh = sharding.make_mesh(config.mesh)
  _, model, params = checkpoint.load(init.location, mesh, log,
                                     model=checkpoint.model_of(config))
  log_probs = jax.jit(lambda params, batch: jax.numpy.stack(
      sequence_log_probs(model, params, batch), axis=1))
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  shardings = sharding.batch_shardings(dpo_objective(), mesh)
  batch_size = config.train.batch_size
  result = {}
  with sharding.activate(mesh):
    for split in SPLITS:
      documents = getattr(pairs, split)
      result[split] = np.zeros((len(documents), 2), np.float32)
      done = 0
      # A few batches' pairs encoded at a time, so the host never holds every pair's rows.
      for start in range(0, len(documents), _BATCHES_ENCODED * batch_size):
        chunk = Subset(documents, np.arange(start, min(start + _BATCHES_ENCODED * batch_size,
                                                       len(documents))))
        for batch in preferences.evaluation_pair_batches(
            chunk, pairs.chat_format, config.model.context_length, batch_size, len(chunk),
            **process):
          values = log_probs(params, sharding.global_batch(batch, mesh, shardings))
          gathered = sharding.to_host(values)
          real = gathered[:start + len(chunk) - done]  # the last batch's padding left out
          result[split][done:done + len(real)] = real
          done += len(real)
  del params
  log(f"Reference log-probabilities of {len(pairs.train)} training and {len(pairs.validation)} "
      f"validation pairs computed with {init.location}")
  if is_primary():
    saved = io.BytesIO()
    np.savez(saved, key=key, **result)
    paths.write_atomically(path, saved.getvalue())
  return result
