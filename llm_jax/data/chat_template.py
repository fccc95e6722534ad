"""The chat template: how a conversation becomes token ids, and which ids are targets.

Our own models (a tokenizer with the three chat tokens, as every llm-jax tokenizer reserves)
read a conversation as

    [bos] <|im_start|>user<|im_sep|>How many ...?<|im_end|><|im_start|>assistant<|im_sep|>There are four ...<|im_end|>

The chat tokens are inserted by id and a message's text is encoded as plain text: a message
that contains the characters `<|im_end|>` is encoded as those characters, so it can neither
close its turn nor open another. A model asked to answer is given the conversation and the
header `<|im_start|>assistant<|im_sep|>`, and its answer ends at `<|im_end|>`.

A tokenizer with a Jinja chat template (an imported Hugging Face model's
tokenizer_config.json) uses that template, rendered with `jinja2` as transformers renders it.
The conversation is cut into turns by rendering it one message longer each time: every
rendering must begin with the one before, and before an assistant message the rendering with
the generation prompt must lie between the two. What an assistant message adds after the
generation prompt is its target. (As in transformers, special-token text inside a message is
not escaped under a Jinja template.)

Targets are the tokens of each assistant turn and the tokens that close it, so a model
learns to stop; everything else is context.
"""

import dataclasses
import datetime
import json
import re

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from llm_jax.errors import UserError

CHAT_TOKENS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>")
_CHAT_TOKEN_TEXT = re.compile("|".join(re.escape(t) for t in CHAT_TOKENS))
# Our format as a Jinja template, for exported tokenizers (transformers' apply_chat_template).
OWN_FORMAT_JINJA = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}<|im_sep|>"
    "{{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}")


@dataclasses.dataclass(frozen=True)
class Turn:
  context: list[int]  # ids read but not trained on (headers, system and user text)
  target: list[int]  # ids trained on: an assistant's words and the tokens that close them


class ChatFormat:
  """How conversations of one tokenizer are encoded: `turns`, `prompt_tail` and `stop_id`."""

  stop_id: int  # the token that ends an assistant's turn

  def turns(self, messages: list[dict]) -> list[Turn]:
    """One `Turn` per message of a (checked) conversation; their ids concatenated are the
    conversation's ids."""
    raise NotImplementedError

  def prompt_tail(self, messages: list[dict]) -> list[int]:
    """What follows the ids of `messages` when the assistant is to answer next."""
    raise NotImplementedError

  def encode(self, messages: list[dict], max_tokens: int | None = None,
             truncate: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, target mask) of a conversation, int32 each, up to its last assistant turn.

    A conversation of more than `max_tokens` ids is None, or with `truncate` cut after the
    last assistant turn that fits (None if not even the first one does).
    """
    turns = self.turns(messages)
    ends = np.cumsum([len(t.context) + len(t.target) for t in turns])
    answered = [i for i, t in enumerate(turns) if t.target]
    fitting = [i for i in answered if max_tokens is None or ends[i] <= max_tokens]
    if not fitting or (fitting[-1] != answered[-1] and not truncate):
      return None
    kept = turns[:fitting[-1] + 1]
    ids = [i for t in kept for i in (*t.context, *t.target)]
    mask = [m for t in kept for m in (*[0] * len(t.context), *[1] * len(t.target))]
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def prompt(self, messages: list[dict]) -> list[int]:
    """The ids a model continues to answer a conversation that ends with a user turn."""
    return [i for t in self.turns(messages) for i in (*t.context, *t.target)] + \
        self.prompt_tail(messages)


class OwnFormat(ChatFormat):
  """`[bos] <|im_start|>role<|im_sep|>text<|im_end|> ...` with the chat tokens by id."""

  def __init__(self, tokenizer, token_ids: list[int]):
    self._tokenizer = tokenizer
    self._start, self._sep, self.stop_id = token_ids

  def _plain(self, text: str) -> list[int]:
    """`text` as plain text: each piece of chat-token text is encoded in two parts, so no
    encode call sees (and turns into a chat token) a whole one."""
    ids, at = [], 0
    for match in _CHAT_TOKEN_TEXT.finditer(text):
      ids += self._tokenizer.encode(text[at:match.start()]) if match.start() > at else []
      ids += self._tokenizer.encode(match.group()[:1]) + self._tokenizer.encode(match.group()[1:])
      at = match.end()
    return ids + (self._tokenizer.encode(text[at:]) if at < len(text) else [])

  def _header(self, role: str) -> list[int]:
    return [self._start, *self._tokenizer.encode(role), self._sep]

  def turns(self, messages: list[dict]) -> list[Turn]:
    turns = []
    for index, message in enumerate(messages):
      context = ([self._tokenizer.bos_id] if index == 0 else []) + self._header(message["role"])
      words = self._plain(message["content"]) + [self.stop_id]
      turns.append(Turn(context, words) if message["role"] == "assistant"
                    else Turn(context + words, []))
    return turns

  def prompt_tail(self, messages: list[dict]) -> list[int]:
    return self._header("assistant")


class JinjaFormat(ChatFormat):
  """A Hugging Face chat template, cut into turns by rendering one message longer each time."""

  _SENTINEL = "\u2063llm-jax-answer\u2063"

  def __init__(self, tokenizer, template: str, special_tokens: dict[str, str]):
    self._tokenizer, self._special_tokens = tokenizer, special_tokens
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
    try:
      self._template = environment.from_string(template)
    except jinja2.TemplateError as e:
      raise UserError(f"The tokenizer's chat template is not valid Jinja ({e}); fix "
                      "chat_template in its tokenizer_config.json.") from None
    # The answer ends at the first token the template writes after an assistant's words
    # (<|eot_id|>, <|im_end|>, ...), or at eos when it writes eos there or nothing.
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": self._SENTINEL}]
    closing = self._render(probe, False).partition(self._SENTINEL)[2]
    closing_ids = tokenizer.encode(closing) if closing else []
    self.stop_id = (tokenizer.eos_id if not closing_ids or tokenizer.eos_id in closing_ids
                    else closing_ids[0])

  def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self._special_tokens)
    except jinja2.TemplateError as e:
      raise UserError(f"The tokenizer's chat template refused a conversation ({e}); give "
                      "conversations it accepts, or fix chat_template in its "
                      "tokenizer_config.json.") from None

  def _extension(self, before: str, after: str, what: str) -> str:
    if not after.startswith(before):
      at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b),
                min(len(before), len(after)))
      raise UserError(
          f"The tokenizer's chat template renders inconsistently: {what} does not begin with "
          f"the rendering before it (they differ from character {at}: {before[at:at + 30]!r} "
          f"vs {after[at:at + 30]!r}), so the conversation cannot be cut into turns; use a "
          "template that renders earlier turns the same whatever follows them.")
    return after[len(before):]

  def turns(self, messages: list[dict]) -> list[Turn]:
    encode, turns, before = self._tokenizer.encode, [], ""
    for index, message in enumerate(messages):
      rendered = self._render(messages[:index + 1], False)
      if message["role"] == "assistant":
        header = self._render(messages[:index], True)
        context = self._extension(before, header, f"the generation prompt after {index} "
                                  "messages")
        words = self._extension(header, rendered, f"the conversation of {index + 1} messages")
        turns.append(Turn(encode(context) if context else [], encode(words) if words else []))
      else:
        context = self._extension(before, rendered, f"the conversation of {index + 1} messages")
        turns.append(Turn(encode(context) if context else [], []))
      before = rendered
    return turns

  def prompt_tail(self, messages: list[dict]) -> list[int]:
    tail = self._extension(self._render(messages, False), self._render(messages, True),
                           "the generation prompt")
    return self._tokenizer.encode(tail) if tail else []


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
  return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def chat_format(tokenizer) -> ChatFormat:
  """The tokenizer's chat template if it has one, else our format if it has the chat tokens
  (also when the template is our own, as an exported llm-jax model carries: by id, as ours)."""
  if tokenizer.chat_template and tokenizer.chat_template != OWN_FORMAT_JINJA:
    special = {"bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
               "eos_token": tokenizer.id_to_piece(tokenizer.eos_id)}
    if tokenizer.pad_id is not None:
      special["pad_token"] = tokenizer.id_to_piece(tokenizer.pad_id)
    return JinjaFormat(tokenizer, tokenizer.chat_template, special)
  token_ids = [tokenizer.piece_id(token) for token in CHAT_TOKENS]
  if None in token_ids:
    raise UserError(f"The run's tokenizer has neither the chat tokens {', '.join(CHAT_TOKENS)} "
                    "nor a chat template, so it cannot encode conversations; fine-tune from a "
                    "model whose tokenizer has them (every tokenizer llm-jax trains does, and "
                    "imported chat models bring a template).")
  return OwnFormat(tokenizer, token_ids)
