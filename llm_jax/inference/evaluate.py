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
"""

import math
from collections.abc import Iterable

import grain

from llm_jax.parallel import sharding
from llm_jax.data import pipeline
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer
from llm_jax.objectives import evaluate_batch
from llm_jax.objectives.next_token import NEXT_TOKEN


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
