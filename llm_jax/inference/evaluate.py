"""Scoring text: mean next-token loss, perplexity and bits per byte; and conversations: the
same loss over the assistant's tokens only.

Each document is scored as it is trained on, `[bos] text [eos]`: every next-token prediction
counts once, the end of the document included. A document longer than the context is cut
into rows that overlap by one token (`pipeline.document_rows`), each scored without the text
before it. The loss is the training loss (`objectives.next_token`) through the same jitted
function as training's evaluation, summed on the device and added up in float64 on the host.

  loss           = sum of token losses (nats) / tokens scored
  perplexity     = exp(loss)
  bits per byte  = sum of token losses / ln 2 / UTF-8 bytes of the documents' text

Conversations are packed whole, as in training (`pipeline.packed_chat_rows`); one longer
than the context is left out and counted.

A reward model scores the last turn of a conversation (`score_responses`) where training reads
it (`objectives.reward_model`): at the response's last token.
"""

import functools
import math
from collections.abc import Iterable, Iterator, Sequence

import grain
import jax
import numpy as np

from llm_jax.parallel import sharding
from llm_jax.data import conversations, pipeline, sources
from llm_jax.data import files as files_lib
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer
from llm_jax.objectives import evaluate_batch
from llm_jax.objectives.next_token import NEXT_TOKEN
from llm_jax.objectives.reward_model import response_rewards


def score_texts(params, model: Transformer, tokenizer: Tokenizer, texts: Iterable[str], *,
                mesh, batch_size: int, max_tokens: int = 0) -> dict:
  """Loss, perplexity and bits per byte of `texts`, with the counts they rest on.

  `batch_size` rows go to the device at a time (it must divide over the mesh's batch axes).
  With `max_tokens > 0`, whole documents are scored until at least that many tokens are.
  """
  row_length = model.config.context_length + 1
  rows, num_bytes, num_documents, num_tokens = [], 0, 0, 0
  for text in texts:
    ids = pipeline.tokenize_document(tokenizer, text)
    rows += map(pipeline.text_row, pipeline.document_rows(ids, row_length))
    num_bytes += len(text.encode("utf-8"))
    num_documents += 1
    num_tokens += len(ids) - 1
    if max_tokens and num_tokens >= max_tokens:
      break
  if not num_tokens:
    raise UserError("There is no text to evaluate; give files with at least one non-empty "
                    "document.")
  loss_sum, count = _score_rows(params, model, rows, row_length, mesh, batch_size)
  loss = loss_sum / count
  return {
      "loss": loss,
      "perplexity": math.exp(loss),
      "bits_per_byte": loss_sum / math.log(2) / max(num_bytes, 1),
      "tokens": int(count),
      "bytes": num_bytes,
      "documents": num_documents,
  }


def score_conversations(params, model: Transformer, chat_format: ChatFormat,
                        conversations: Iterable[list[dict]], *, mesh, batch_size: int) -> dict:
  """Loss and perplexity over the assistant tokens of `conversations` (and their ends of
  turn), with the conversations scored and those too long for the context."""
  conversations = list(conversations)
  rows = list(pipeline.packed_chat_rows(
      grain.MapDataset.source(conversations), chat_format, model.config.context_length,
      seed=None, repeat=False, truncate=False))
  scored = sum(len(set(row["tokens_segment_ids"].tolist()) - {0}) for row in rows)
  if not scored:
    raise UserError(f"None of the {len(conversations)} conversations fits the context of "
                    f"{model.config.context_length} tokens; give shorter ones.")
  loss_sum, count = _score_rows(params, model, rows, model.config.context_length + 1, mesh,
                                batch_size)
  loss = loss_sum / count
  return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count),
          "conversations": scored, "too_long": len(conversations) - scored}


def _score_rows(params, model, rows, row_length: int, mesh, batch_size: int
                ) -> tuple[float, float]:
  """(summed loss, target count) of packed `rows`, on the device `batch_size` rows at a time."""
  loss_sum = count = 0.0
  with sharding.activate(mesh):
    for batch in pipeline.scoring_batches(rows, row_length, batch_size):
      batch_loss, batch_count, _ = evaluate_batch(
          params, sharding.global_batch(batch, mesh), objective=NEXT_TOKEN, model=model)
      loss_sum += float(batch_loss)
      count += float(batch_count)
  return loss_sum, count


@functools.partial(jax.jit, static_argnames="model")
def _response_rewards(params, inputs_BT, weights_BT, *, model):
  return response_rewards(model, params, inputs_BT, weights_BT)


def score_responses(params, model: Transformer, chat_format: ChatFormat,
                    conversations: Sequence[list[dict]], *, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(a reward model's score [R] of the last turn of each conversation, whether it fit [R]):
  a conversation longer than the context is not scored (its score is NaN)."""
  context = model.config.context_length
  inputs = np.zeros((len(conversations), context), np.int32)
  weights = np.zeros((len(conversations), context), np.float32)
  fits = np.ones(len(conversations), bool)
  for i, messages in enumerate(conversations):
    ids, mask = chat_format.encode(messages)
    if len(ids) > context:
      fits[i] = False
      continue
    inputs[i, :len(ids)] = ids
    weights[i, :len(ids) - 1] = mask[1:]  # the target at t is the id at t + 1
  with sharding.activate(mesh):
    scores = sharding.to_host(_response_rewards(params, inputs, weights, model=model))
  return np.where(fits, scores, np.nan), fits


def score_run(run, files: str | None = None, max_tokens: int = 0, batch_size: int | None = None,
              chat: str | None = None) -> dict:
  """Loss and perplexity (above) of a loaded run (`llm_jax.inference.run.Run`), with the
  counts behind them.

  Scores the run's validation split, every document of the files matching `files` (and
  their bits per byte), or the assistant tokens of the conversations in the `.jsonl` files
  matching `chat`. `batch_size` (default: the run's) is rounded up to divide over the mesh.
  """
  batch_size = batch_size or run.config.train.batch_size
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be at least 1.")
  if max_tokens < 0:
    raise UserError(f"max_tokens={max_tokens} must be 0 (everything) or positive.")
  data_parallel = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  batch_size = math.ceil(batch_size / data_parallel) * data_parallel
  if files and chat:
    raise UserError("Give files or chat, not both.")
  if chat and max_tokens:
    raise UserError("max_tokens limits text scoring; chat scores every conversation.")
  if chat:
    source = conversations.open_all_chats(chat)
    return {**_score_conversations(run, [source.train], batch_size),
            "skipped": {reason: n for reason, n in source.skipped.items() if n}}
  if files:
    documents = [files_lib.open_files(files, 0.0, text_key=run.config.data.text_key,
                                      split=False).train]
  else:
    mixture = sources.open_sources(run.config.data)
    kinds = {source.kind for source, _ in mixture}
    if "preferences" in kinds:
      raise UserError("This run trained on preference pairs; its validation loss and "
                      "accuracy are in metrics.jsonl (val_loss, val_accuracy).")
    if "prompts" in kinds:
      raise UserError("This run learned from its answers to prompts; the reward of its "
                      "answers to validation prompts is in metrics.jsonl (val_reward); score "
                      "text with files or conversations with chat.")
    if kinds == {"chat"}:
      return _score_conversations(run, [source.validation for source, _ in mixture],
                                  batch_size)
    if len(kinds) > 1:
      raise UserError("This run trained on text and conversations; score each with files "
                      "or chat.")
    documents = [source.validation for source, _ in mixture]
  return score_texts(
      run.params, run.model, run.tokenizer, _each_document(documents), mesh=run.mesh,
      batch_size=batch_size, max_tokens=max_tokens)


def _score_conversations(run, collections: list[Documents], batch_size: int) -> dict:
  return score_conversations(
      run.params, run.model, run.chat_format, _each_document(collections),
      mesh=run.mesh, batch_size=batch_size)


def _each_document(collections: list[Documents]) -> Iterator[str]:
  for documents in collections:
    for index in range(len(documents)):
      yield documents[index]
