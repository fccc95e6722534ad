"""Conversations: what a chat (and a prompt to answer) is, how one is checked, and `chat:<glob>`
sources of them.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`:
an optional system message first, then user and assistant turns alternating, starting with
the user. `.jsonl` files hold one conversation a line in either form people have:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}  (ShareGPT)

A line that cannot be used (not JSON, neither form, an unknown role, turns that do not
alternate, an empty message, no assistant turn to learn from) is skipped and counted by
reason; the split and deduplication are those of text files (`llm_jax.data.files`).
"""

from llm_jax.data import files
from llm_jax.data.documents import Source
from llm_jax.errors import UserError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}
FORMS_HINT = ('give one {"messages": [{"role": ..., "content": ...}, ...]} or ShareGPT '
              '{"conversations": [{"from": ..., "value": ...}, ...]} object a line')


class BadConversation(files.SkipDocument):
  """A conversation that cannot be used; `reason` is how it is counted."""


def from_record(record) -> list[dict]:
  """The conversation of one JSON line, in either form, checked (`check`)."""
  if isinstance(record, dict) and isinstance(record.get("messages"), list):
    turns, role_key, text_key, names = record["messages"], "role", "content", None
  elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
    turns, role_key, text_key, names = record["conversations"], "from", "value", _SHAREGPT_ROLES
  else:
    raise BadConversation("no messages")
  messages = []
  for turn in turns:
    if not isinstance(turn, dict):
      raise BadConversation("no messages")
    role = turn.get(role_key)
    role = names.get(role) if names and isinstance(role, str) else role
    messages.append({"role": role, "content": turn.get(text_key)})
  check(messages)
  if not any(m["role"] == "assistant" for m in messages):
    raise BadConversation("no assistant turn")
  return messages


def check(messages: list[dict]) -> None:
  """Raises `BadConversation` unless `messages` is a conversation as described above."""
  if not messages:
    raise BadConversation("no messages")
  for index, message in enumerate(messages):
    if not isinstance(message, dict):
      raise BadConversation("no messages")
    if message.get("role") not in ROLES:
      raise BadConversation("unknown role")
    if not isinstance(message.get("content"), str) or not message["content"].strip():
      raise BadConversation("empty message")
    if message["role"] == "system":
      if index:
        raise BadConversation("not alternating")
      continue
    expected = "user" if (index - (messages[0]["role"] == "system")) % 2 == 0 else "assistant"
    if message["role"] != expected:
      raise BadConversation("not alternating")


def as_messages(value, role: str) -> list[dict]:
  """`value` as messages, not yet checked: a string as one message of `role`, a list of dicts
  as their role and content (other keys dropped); raises `BadConversation` for anything else."""
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, list) and all(isinstance(m, dict) for m in value):
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]
  raise BadConversation("no messages")


def prompt_of(value) -> list[dict]:
  """A prompt as a conversation for a model to answer (`as_messages`, a string being one user
  turn) that passes `check` and ends with a user turn; raises `BadConversation` otherwise."""
  messages = as_messages(value, "user")
  check(messages)
  if messages[-1]["role"] != "user":  # nothing to answer after an assistant's turn
    raise BadConversation("no user turn last")
  return messages


_WHAT_IS_WRONG = {
    "no messages": "it is not a list of messages",
    "unknown role": f"a role is not one of {', '.join(ROLES)}",
    "empty message": "a message has no text",
    "not alternating": "its turns do not alternate (an optional system message, then user "
                       "and assistant in turn, starting with the user)",
}


def checked(messages, purpose: str) -> list[dict]:
  """`messages` as given from Python or a terminal, or one sentence on what is wrong."""
  try:
    check(list(messages))
  except BadConversation as e:
    raise UserError(f"The conversation to {purpose} is malformed: {_WHAT_IS_WRONG[e.reason]}; "
                    "give a list of {'role': ..., 'content': ...} messages.") from None
  return list(messages)


def contents(messages: list[dict]) -> str:
  """The words of a conversation as plain text (to train a tokenizer on)."""
  return "\n".join(m["content"] for m in messages)


def open_chat(spec: str, val_fraction: float) -> Source:
  """The `chat:<glob>` source: conversations of `.jsonl` files, split and deduplicated."""
  return files.open_files(spec.removeprefix("chat:"), val_fraction, read_record=from_record,
                          kind="chat", hint=FORMS_HINT)


def open_all_chats(pattern: str) -> Source:
  """Every usable conversation of the `.jsonl` files matching `pattern`, unsplit, in
  `.train` (to evaluate on); `.skipped` counts the lines that were not."""
  return files.open_files(pattern, 0.0, read_record=from_record, kind="chat",
                          hint=FORMS_HINT, split=False)

