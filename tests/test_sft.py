"""Supervised fine-tuning end to end: a tiny pretrained run fine-tuned on conversations with the
`configs/posttrain.py:sft` preset, then answered through `Run.chat`, `generate --chat`, the
piped `chat` command and `eval --chat`, and the bad input of each."""

import dataclasses
import io
import json
import math
import shutil

import numpy as np
import pytest
import scipy.special

from llm_jax.parallel import checkpoint
from llm_jax import cli, config as config_lib
from llm_jax.data import hf_tokenizer
from llm_jax.errors import UserError
from llm_jax.inference.run import load_run
from llm_jax.cli.train import end_of_run_sample
from llm_jax.train.loop import train

from conftest import TINY_OVERRIDES, build, snapshot, tiny_config

_TRAIN = [o for o in TINY_OVERRIDES if o.startswith("train.")] + [
    "train.steps=12", "train.warmup_steps=2", "train.eval_every=6", "train.checkpoint_every=6",
    "train.learning_rate=3e-3", "train.sample_tokens=4", "model.matmul_precision=float32"]


def _word(rng, n=5) -> str:
  return "".join(rng.choice(list("abcdefghij"), n))


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  """Short conversations whose answers repeat a word of the question, in both line forms."""
  root = tmp_path_factory.mktemp("chats")
  rng = np.random.default_rng(0)
  lines = []
  for i in range(80):
    word = _word(rng)
    question, answer = f"say {word}", f"{word}."
    if i % 4 == 0:
      lines.append({"conversations": [{"from": "human", "value": question},
                                      {"from": "gpt", "value": answer}]})
    else:
      lines.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": answer}]})
  (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  held_out = [{"messages": [{"role": "user", "content": f"say {w}"},
                            {"role": "assistant", "content": f"{w}."}]}
              for w in (_word(rng) for _ in range(6))]
  (root / "held_out.jsonl").write_text("".join(json.dumps(line) + "\n" for line in held_out))
  return root


@pytest.fixture(scope="module")
def base(text_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("base")
  # A context long enough for a system message and two exchanges, whose tokens are mostly
  # single characters under this tokenizer.
  train(tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=6",
                    "train.sample_tokens=0", "model.context_length=96"), workdir)
  return workdir


@pytest.fixture(scope="module")
def sft(base, chats, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft")
  config = config_lib.load_config("configs/posttrain.py:sft", [
      *_TRAIN, f"train.init_from={base}", f"data.source=chat:{chats}/train.jsonl"])
  summary = train(config, workdir)
  return workdir, summary


@pytest.fixture(scope="module")
def run(sft):
  return load_run(sft[0])


def test_the_preset_takes_the_model_of_the_run_it_starts_from(base, sft):
  saved = json.loads((sft[0] / "config.json").read_text())
  assert saved["model"] == json.loads((base / "config.json").read_text())["model"]
  assert saved["model"]["d_model"] == 64  # the tiny model, not the preset's default shape
  assert saved["train"]["learning_rate"] == 3e-3 and saved["train"]["model_from_init"]


def test_fine_tuning_trains_on_assistant_tokens_only_and_learns_them(sft):
  workdir, summary = sft
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  trained = [r for r in rows if "target_tokens" in r]
  # A batch has 8 rows of 96 positions; the answers ("abcde." and <|im_end|>) are a few each.
  assert all(0 < r["target_tokens"] < 8 * 96 / 4 for r in trained)
  evaluations = [r["val_loss"] for r in rows if "val_loss" in r]
  assert evaluations[-1] < evaluations[0]
  sample = end_of_run_sample(config_lib.from_json((workdir / "config.json").read_text()), workdir)
  assert sample.startswith("user: What does `json.dumps` do?\nassistant: ")


def _direct_assistant_loss(run, messages) -> tuple[float, int]:
  """Summed loss over one conversation's assistant tokens, from the model alone on it."""
  ids, mask = run.chat_format.encode(messages)
  logits = np.asarray(run.model.apply({"params": run.params}, ids[None, :-1]))[0]
  log_probs = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
  picked = -log_probs[np.arange(len(ids) - 1), ids[1:]]
  return float((picked * mask[1:]).sum()), int(mask[1:].sum())


def test_eval_chat_scores_each_conversation_alone_on_its_answers(run, chats):
  result = run.evaluate(chat=f"{chats}/held_out.jsonl", batch_size=8)
  held_out = [json.loads(line)["messages"]
              for line in (chats / "held_out.jsonl").read_text().splitlines()]
  losses, counts = zip(*(_direct_assistant_loss(run, m) for m in held_out))
  assert result["conversations"] == len(held_out) and result["too_long"] == 0
  assert result["tokens"] == sum(counts)
  assert result["loss"] == pytest.approx(sum(losses) / sum(counts), rel=1e-4)
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def _cli(capsys, monkeypatch, argv, stdin=""):
  monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
  status = cli.main(argv)
  out, err = capsys.readouterr()
  return status, out, err


def test_generate_chat_asks_each_prompt_as_a_user_turn(run, sft, capsys, monkeypatch):
  status, out, _ = _cli(capsys, monkeypatch, ["generate", "--workdir", str(sft[0]), "--chat",
                                               "--prompt", "say abcde", "--max_new_tokens", "6"])
  assert status == 0
  answer = run.chat([{"role": "user", "content": "say abcde"}], 6)
  assert out == answer + "\n"
  ids = run.chat_format.prompt([{"role": "user", "content": "say abcde"}])
  assert run.tokenizer.decode(ids).endswith("<|im_start|>assistant<|im_sep|>")


def test_piped_chat_keeps_the_history_and_takes_commands(run, sft, capsys, monkeypatch):
  workdir = str(sft[0])
  stdin = "say abcde\n/system be brief\nsay fghij\n/bogus\n/reset\nsay abcde\n/exit\nsay x\n"
  status, out, err = _cli(capsys, monkeypatch, ["chat", "--workdir", workdir,
                                                "--max_new_tokens", "4"], stdin)
  assert status == 0
  answers = out.split("\n")[:-1]
  assert len(answers) == 3  # three user lines before /exit; the commands print no answer
  first = run.chat([{"role": "user", "content": "say abcde"}], 4)
  history = [{"role": "user", "content": "say abcde"}, {"role": "assistant", "content": first}]
  system = [{"role": "system", "content": "be brief"}]
  second = run.chat(system + history + [{"role": "user", "content": "say fghij"}], 4, seed=1)
  assert answers[:2] == [first, second]
  # After /reset the history is gone (the system message stays).
  assert answers[2] == run.chat(system + [{"role": "user", "content": "say abcde"}], 4, seed=5)
  assert "system message set" in err and "unknown command /bogus" in err
  assert "starts over" in err


def test_a_full_context_drops_the_oldest_exchange_with_a_notice(run, sft, capsys, monkeypatch):
  # Questions of just over half the 96 tokens: the second one pushes out the first exchange.
  question = next(q for q in (f"say {'abcdefghij' * n}" for n in range(1, 20))
                  if len(run.chat_format.prompt([{"role": "user", "content": q}])) > 50)
  status, out, err = _cli(capsys, monkeypatch, ["chat", "--workdir", str(sft[0]),
                                                "--max_new_tokens", "4"],
                          f"{question}\n{question[::-1]}\n")
  assert status == 0 and len(out.split("\n")) == 3
  assert "dropped the oldest 1 exchange" in err
  status, out, err = _cli(capsys, monkeypatch, ["chat", "--workdir", str(sft[0])],
                          "word " * 40 + "\n")
  assert status == 0 and out == "" and "leaves less than" in err


def test_chat_on_a_tokenizer_without_chat_tokens_is_one_sentence(run):
  import tokenizers
  words = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
  plain = hf_tokenizer.HFTokenizer(words.to_str(), {"bos_token": "<s>", "eos_token": "</s>"},
                                   "a test")
  with pytest.raises(UserError, match="neither the chat tokens .* nor a chat template"):
    dataclasses.replace(run, tokenizer=plain).chat([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("messages, words", [
    ([], "malformed"),
    ([{"role": "user", "content": "   "}], "has no text"),
    ([{"role": "robot", "content": "hi"}], "not one of"),
    ([{"role": "assistant", "content": "hi"}], "do not alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "end with a user"),
])
def test_malformed_conversations_are_refused_in_one_sentence(run, messages, words):
  with pytest.raises(UserError, match=words):
    run.chat(messages)


def test_bad_chat_data_and_init_from_fail_before_writing(base, chats, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('not json\n{"messages": [{"role": "user", "content": "hi"}]}\n')
  workdir = tmp_path / "run"
  argv = ["train", "--config", "configs/posttrain.py:sft", *[f"--config.{o}" for o in _TRAIN],
          "--workdir", str(workdir)]
  assert cli.main(argv + [f"--config.train.init_from={base}",
                          f"--config.data.source=chat:{bad}"]) == 2
  err = capsys.readouterr().err
  assert "No usable conversation" in err and "1 not JSON" in err
  assert "1 no assistant turn" in err
  assert cli.main(argv + [f"--config.train.init_from={tmp_path}",
                          f"--config.data.source=chat:{chats}/*.jsonl"]) == 2
  assert "not a run directory with checkpoints" in capsys.readouterr().err
  # Nothing too long to train on is an error, never a run that trains on nothing.
  assert cli.main(argv + [f"--config.train.init_from={base}",
                          f"--config.data.source=chat:{chats}/*.jsonl",
                          "--config.train.model_from_init=false",
                          *[f"--config.{o}" for o in TINY_OVERRIDES if o.startswith("model.")],
                          "--config.model.context_length=4"]) == 2
  assert "nothing to train on" in capsys.readouterr().err
  assert not workdir.exists()  # a refusal writes nothing, not even a tokenizer


def test_eval_chat_command_and_a_run_left_as_it_was(sft, chats, capsys, monkeypatch):
  before = snapshot(sft[0])
  status, out, _ = _cli(capsys, monkeypatch, ["eval", "--workdir", str(sft[0]), "--chat",
                                               f"{chats}/held_out.jsonl"])
  assert status == 0 and "6 conversations" in out and "assistant tokens" in out
  status, out, _ = _cli(capsys, monkeypatch, ["eval", "--workdir", str(sft[0])])
  assert status == 0 and "conversations" in out  # the run's own validation conversations
  assert snapshot(sft[0]) == before


@pytest.mark.parametrize("preset, source", [("dpo", "preferences:pairs.jsonl"),
                                            ("grpo", "prompts:prompts.jsonl")])
def test_a_run_resumed_with_another_objective_is_refused_before_writing(sft, preset, source,
                                                                        capsys):
  workdir = sft[0]
  before = snapshot(workdir)
  assert cli.main(["train", "--config", f"configs/posttrain.py:{preset}",
                   *[f"--config.{o}" for o in _TRAIN], f"--config.data.source={source}",
                   f"--config.train.init_from={workdir}", "--config.rl.reward=m:f",
                   "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert "trained objective.name='next_token'" in err and "a new --workdir" in err
  assert "Traceback" not in err
  assert snapshot(workdir) == before


def test_a_data_position_that_does_not_fit_is_refused_not_set_aside(sft, tmp_path):
  """A checkpoint that reads but does not fit the state asked of it is the user's mistake:
  it stays where it is, and no older checkpoint is tried in its place."""
  copy = tmp_path / "copy"
  shutil.copytree(sft[0], copy)

  class OtherData:  # a batch source whose position has other keys
    def set_state(self, state):
      return state["other_position"]

  config = config_lib.from_json((copy / "config.json").read_text())
  abstract = build(config).abstract_state()
  checkpointer = checkpoint.Checkpointer(copy / "checkpoints")
  steps = checkpointer.steps()
  with pytest.raises(UserError, match="data position .* is not one this run's data can resume"):
    checkpoint.restore_newest(checkpointer, lambda step: checkpointer.restore(
        step, abstract, OtherData()), print)
  checkpointer.close()
  assert checkpoint.saved_steps(copy / "checkpoints") == steps
  assert not (copy / "damaged_checkpoints").exists()
