"""A trained run, loaded for inference: generate text, read the next-token distribution, score.

    from llm_jax.inference.run import load_run
    run = load_run("runs/default")              # newest readable checkpoint of the run
    run.generate("def main():", max_new_tokens=64, temperature=0.8, top_p=0.95)
    run.chat([{"role": "user", "content": "What does json.dumps do?"}])   # the answer
    run.next_token_distribution("import ", top=5)
    run.evaluate()                              # the run's validation split; or files="*.txt"
    run.evaluate(chat="held_out/*.jsonl")       # assistant tokens of conversations
    load_run("runs/rm").reward("What is 17+25?", "42")   # a reward model's score

Loading reads the newest checkpoint's config and tokenizer (both are saved inside every
checkpoint) and restores only its parameters, sharded over a mesh of this machine's devices.
It never writes to the run directory. Token-level work is in `llm_jax.inference.generate` and
`llm_jax.inference.evaluate`; this module turns text into ids and back.
"""

import dataclasses
import functools
import pathlib
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from llm_jax.parallel import checkpoint, sharding
from llm_jax.inference import sampling
from llm_jax import config as config_lib
from llm_jax.inference import evaluate as evaluate_lib
from llm_jax.inference import generate as generate_lib
from llm_jax.data import chat_template, conversations
from llm_jax.data.tokenizer import Tokenizer, tokenizer_from_bytes
from llm_jax.parallel.distributed import log
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer

# New tokens when none are asked for: the rest of the context, but at most this many.
DEFAULT_MAX_NEW_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class NextToken:
  id: int
  piece: str
  probability: float


@dataclasses.dataclass(frozen=True)
class Distribution:
  """The most likely next tokens, and the probability mass of all the others."""
  top: list[NextToken]
  rest: float  # summed probability of every token not in `top`
  rest_count: int  # how many tokens that is


@dataclasses.dataclass
class Run:
  workdir: pathlib.Path
  step: int  # the training step of the loaded checkpoint
  config: ml_collections.ConfigDict
  model: Transformer
  params: dict
  tokenizer: Tokenizer
  mesh: Mesh

  def encode_prompt(self, prompt: str) -> list[int]:
    """A prompt as the model saw documents start: `[bos]` then the text's tokens."""
    if not prompt:
      raise UserError("The prompt is empty; give some text to continue.")
    return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

  def generate(self, prompts: str | Sequence[str], max_new_tokens: int | None = None, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
               beams: int = 1, length_penalty: float = 1.0, num_samples: int = 1,
               seed: int = 0, batch_size: int = 16, chat: bool = False) -> list[list[str]]:
    """`num_samples` continuations of each prompt (a list per prompt), without the prompt;
    with `chat`, each prompt is a user's turn and the texts are the assistant's answers.

    `max_new_tokens=None` fills the rest of the context, up to DEFAULT_MAX_NEW_TOKENS.
    Sampling (temperature > 0) draws `num_samples` independent continuations; beam search
    (`beams > 1`, deterministic) returns its `num_samples` best beams. Prompts go to the
    device `batch_size` rows at a time (a prompt and its samples together); the result is
    deterministic for a given seed and batch size.
    """
    self._language_model()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompt_ids = [self.chat_format.prompt(self._user_turn(p)) if chat else self.encode_prompt(p)
                  for p in prompts]
    if not prompt_ids:
      raise UserError("No prompts were given; give at least one.")
    if num_samples < 1:
      raise UserError(f"num_samples={num_samples} must be at least 1.")
    if batch_size < 1:
      raise UserError(f"batch_size={batch_size} must be at least 1.")
    sampling.check_options(temperature, top_k, top_p, self.tokenizer.vocab_size)
    if max_new_tokens is None:
      max_new_tokens = self._room_after(max(len(p) for p in prompt_ids))
    eos = self.chat_format.stop_id if chat else self.tokenizer.eos_id
    with sharding.activate(self.mesh):
      if beams != 1:
        if temperature > 0 or top_k is not None or top_p < 1:
          raise UserError("Beam search is deterministic; drop temperature, top_k and top_p, "
                          "or use beams=1 to sample.")
        new_ids = []
        for chunk in _chunks(prompt_ids, batch_size):
          for hypotheses in generate_lib.beam_search(
              self.params, self.model, chunk, max_new_tokens, eos_id=eos, beams=beams,
              length_penalty=length_penalty, num_return=num_samples,
              num_tokens=self.tokenizer.vocab_size):
            new_ids += [h.tokens for h in hypotheses]
      else:
        if num_samples > 1 and temperature == 0:
          raise UserError(f"num_samples={num_samples} with temperature=0 (greedy) would "
                          "repeat one text; set temperature above 0 or use beams.")
        # Each prompt is prefilled once for its samples; every chunk has the same number of
        # rows (the last one padded with its final prompt), so all compile to one program.
        per_chunk = max(1, batch_size // num_samples)
        new_ids = []
        for index, chunk in enumerate(_chunks(prompt_ids, per_chunk)):
          padded = chunk + [chunk[-1]] * (min(per_chunk, len(prompt_ids)) - len(chunk))
          new_ids += generate_lib.generate(
              self.params, self.model, padded, max_new_tokens, eos_id=eos,
              temperature=temperature, top_k=top_k, top_p=top_p,
              seed=_chunk_seed(seed, index), num_tokens=self.tokenizer.vocab_size,
              samples=num_samples)[:len(chunk) * num_samples]
    texts = [self.tokenizer.decode(ids) for ids in new_ids]
    return [texts[i:i + num_samples] for i in range(0, len(texts), num_samples)]

  def _room_after(self, prompt_tokens: int) -> int:
    """New tokens when none are asked for: the rest of the context, up to the default."""
    room = self.model.config.context_length - prompt_tokens
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, room))

  def stream(self, prompt: str, max_new_tokens: int | None = None, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
             seed: int = 0) -> Iterator[str]:
    """Yields the continuation of `prompt` piece by piece as it is decoded: the text
    `generate` returns for the same arguments (one prompt, one sample)."""
    return self._stream(self.encode_prompt(prompt), self.tokenizer.eos_id, max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

  def _stream(self, ids: list[int], stop_id: int, max_new_tokens: int | None, *,
              temperature: float, top_k: int | None, top_p: float, seed: int) -> Iterator[str]:
    self._language_model()
    # Checked before the generator starts, so bad options fail before any output.
    sampling.check_options(temperature, top_k, top_p, self.tokenizer.vocab_size)
    if max_new_tokens is None:
      max_new_tokens = self._room_after(len(ids))
    return self._pieces(ids, stop_id, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed)

  def _pieces(self, ids, stop_id, max_new_tokens, *, temperature, top_k, top_p, seed):
    new_ids, shown = [], ""
    with sharding.activate(self.mesh):
      for token in generate_lib.stream(
          self.params, self.model, ids, max_new_tokens, eos_id=stop_id,
          temperature=temperature, top_k=top_k, top_p=top_p, seed=_chunk_seed(seed, 0),
          num_tokens=self.tokenizer.vocab_size):
        new_ids.append(token)
        text = self.tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a character's bytes
          yield text[len(shown):]
          shown = text
    text = self.tokenizer.decode(new_ids)
    if text != shown:
      yield text[len(shown):]

  def _language_model(self) -> None:
    if self.model.config.reward_head:
      raise UserError(f"{self.workdir} is a reward model: it scores answers (`llm-jax reward`) "
                      "and has no next-token head to write or score text with.")

  def reward(self, prompt: str | Sequence[dict], response: str) -> float:
    """A reward model's score of `response` as the answer to `prompt` (a user's text, or a
    conversation that ends with a user's turn), read where training reads it: at the last
    token of the response."""
    if not self.model.config.reward_head:
      raise UserError(f"{self.workdir} is not a reward model; train one with --config "
                      "configs/posttrain.py:reward.")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = conversations.checked(turns + [{"role": "assistant", "content": response}],
                                     "score")
    (score,), (fits,) = evaluate_lib.score_responses(self.params, self.model, self.chat_format,
                                                     [messages], mesh=self.mesh)
    if not fits:
      raise UserError(f"The prompt and response are {len(self.chat_format.encode(messages)[0])} "
                      f"tokens, more than the context of {self.model.config.context_length}; "
                      "shorten them.")
    return float(score)

  @functools.cached_property
  def chat_format(self) -> chat_template.ChatFormat:
    """How this run's tokenizer encodes conversations (an error if it cannot)."""
    return chat_template.chat_format(self.tokenizer)

  @staticmethod
  def _user_turn(prompt: str) -> list[dict]:
    return conversations.checked([{"role": "user", "content": prompt}], "answer")

  def chat(self, messages: Sequence[dict], max_new_tokens: int | None = None, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           seed: int = 0) -> str:
    """The assistant's answer to a conversation that ends with a user's turn."""
    return "".join(self.stream_chat(messages, max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed))

  def stream_chat(self, messages: Sequence[dict], max_new_tokens: int | None = None, *,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                  seed: int = 0) -> Iterator[str]:
    """`chat`'s answer piece by piece as it is decoded, ending at the end of the turn."""
    messages = conversations.checked(messages, "answer")
    if messages[-1]["role"] != "user":
      raise UserError("The conversation to answer must end with a user's message.")
    ids = self.chat_prompt(messages, max_new_tokens or 1)
    return self._stream(ids, self.chat_format.stop_id, max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed)

  def chat_prompt(self, messages: Sequence[dict], room: int = 1) -> list[int]:
    """The ids the model continues to answer `messages`, refused if they leave fewer than
    `room` tokens of the context for the answer."""
    ids = self.chat_format.prompt(list(messages))
    context = self.model.config.context_length
    if len(ids) + room > context:
      raise UserError(f"The conversation is {len(ids)} tokens, which leaves less than {room} "
                      f"of the context of {context} for the answer; shorten it.")
    return ids

  def next_token_distribution(self, prompt: str, top: int = 10) -> Distribution:
    """The `top` most likely tokens after `prompt`, and the mass of the rest."""
    self._language_model()
    vocab = self.tokenizer.vocab_size
    if not 1 <= top <= vocab:
      raise UserError(f"top={top} must be between 1 and the vocabulary size {vocab}.")
    with sharding.activate(self.mesh):
      probs_V = generate_lib.next_token_probs(self.params, self.model,
                                              [self.encode_prompt(prompt)], vocab)[0]
    probs_V = probs_V.astype(np.float64)
    order = np.argsort(-probs_V, kind="stable")
    shown = [NextToken(int(i), self.tokenizer.id_to_piece(int(i)), float(probs_V[i]))
             for i in order[:top]]
    return Distribution(shown, float(probs_V[order[top:]].sum()), vocab - top)

  def evaluate(self, files: str | None = None, max_tokens: int = 0,
               batch_size: int | None = None, chat: str | None = None) -> dict:
    """Loss and perplexity with the counts behind them, of the run's validation split, of the
    files matching `files` or of the conversations matching `chat`
    (`llm_jax.inference.evaluate.score_run`)."""
    self._language_model()
    return evaluate_lib.score_run(self, files, max_tokens, batch_size, chat)


def _chunk_seed(seed: int, index: int) -> int:
  """The sampling seed of the `index`-th chunk of prompts of a call made with `seed`."""
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _chunks(items: list, size: int) -> Iterator[list]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _inference_mesh(config, mesh_overrides: Sequence[str]) -> Mesh:
  """The run's own mesh if it fits this machine's devices, else every device on fsdp."""
  for override in mesh_overrides:
    if not override.removeprefix("config.").startswith("mesh."):
      raise UserError(f"Only --config.mesh.* values can be changed when loading a run "
                      f"(got {override!r}).")
    config_lib.apply_override(config, override)
  try:
    return sharding.make_mesh(config.mesh)
  except UserError:
    if mesh_overrides:
      raise
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return sharding.make_mesh(config.mesh)


def load_run(workdir, mesh_overrides: Sequence[str] = (), step: int | None = None) -> Run:
  """The newest readable checkpoint of the run in `workdir` (or the one of `step`), ready
  for inference.

  A checkpoint that cannot be read is reported on stderr and the one before it is used;
  nothing in the run directory is moved or written.
  """
  workdir = pathlib.Path(workdir)
  directory = workdir / "checkpoints"
  steps = checkpoint.saved_steps(directory)
  if not steps:
    raise UserError(f"{workdir} has no checkpoint; train one with `llm-jax train --workdir "
                    f"{workdir}` or point --workdir at a run directory.")
  if step is not None and step not in steps:
    raise UserError(f"{workdir} has no checkpoint at step {step}; it has steps "
                    f"{', '.join(map(str, steps))}.")
  source, model, params = checkpoint.load(
      workdir if step is None else directory / str(step),
      lambda config: _inference_mesh(config, mesh_overrides), log, option="workdir")
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  return Run(workdir, source.step, source.config, model, params,
             tokenizer_from_bytes(source.tokenizer), mesh)
