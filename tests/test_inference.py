"""Inference on a run made by the training loop: generate, predict and eval, as a library and
as commands, and their handling of bad input."""

import json
import math

import jax
import numpy as np
import pytest
import scipy.special

from llm_jax import cli
from llm_jax.inference import generate as generate_lib
from llm_jax.errors import UserError
from llm_jax.inference.run import load_run
from llm_jax.train.loop import train

from conftest import snapshot, tiny_config


@pytest.fixture(scope="module")
def workdir(text_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  train(tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=10",
                    "train.sample_tokens=0"), workdir)
  return workdir


@pytest.fixture(scope="module")
def run(workdir):
  return load_run(workdir)


def _cli(capsys, *argv):
  status = cli.main(list(argv))
  out, err = capsys.readouterr()
  return status, out, err


def test_loading_restores_the_trained_parameters_and_writes_nothing(workdir, run):
  from llm_jax import config as config_lib
  from llm_jax.parallel.checkpoint import Checkpointer
  from llm_jax.train import builder
  assert run.step == 10
  built = builder.build(config_lib.resolve(run.config), run.mesh)
  full = Checkpointer(workdir / "checkpoints").restore(10, built.abstract_state(), _NoData())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params),
               jax.device_get(full.params))
  before = snapshot(workdir)
  load_run(workdir)
  assert snapshot(workdir) == before


class _NoData:
  def set_state(self, state):
    self.state = state


def test_the_tokenizer_comes_from_the_checkpoint(workdir, tmp_path):
  import shutil
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "tokenizer.model").unlink()
  assert load_run(copy).tokenizer.to_bytes() == (workdir / "tokenizer.model").read_bytes()


def test_generate_command_prints_only_the_text(capsys, run, workdir):
  status, out, err = _cli(capsys, "generate", "--workdir", str(workdir), "--prompt",
                          "def main(", "--max_new_tokens", "12")
  assert status == 0
  expected = run.generate("def main(", 12)[0][0]
  assert out == expected + "\n"
  assert "Loaded" in err and "Loaded" not in out


def test_generate_many_prompts_and_samples_as_jsonl(capsys, run, workdir, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps("import ") + "\n" + json.dumps({"prompt": "class A"}) + "\n")
  args = ["generate", "--workdir", str(workdir), "--prompt_file", str(prompts), "--jsonl",
          "--max_new_tokens", "6", "--temperature", "0.9", "--top_k", "40", "--top_p", "0.9",
          "--num_samples", "3", "--seed", "4"]
  status, out, _ = _cli(capsys, *args)
  assert status == 0
  rows = [json.loads(line) for line in out.splitlines()]
  assert [(r["prompt_index"], r["sample"]) for r in rows] == [(i, s) for i in (0, 1)
                                                               for s in range(3)]
  assert [r["prompt"] for r in rows[::3]] == ["import ", "class A"]
  assert _cli(capsys, *args)[1] == out  # the same seed gives the same texts


def test_beam_search_command_returns_the_best_beams(capsys, run, workdir):
  status, out, _ = _cli(capsys, "generate", "--workdir", str(workdir), "--prompt", "def ",
                        "--beams", "3", "--num_samples", "2", "--max_new_tokens", "5", "--jsonl")
  assert status == 0
  texts = [json.loads(line)["text"] for line in out.splitlines()]
  assert texts == run.generate("def ", 5, beams=3, num_samples=2)[0]


@pytest.mark.parametrize("args, words", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x " * 40], "exceeds the context"),
    (["--prompt", "def", "--max_new_tokens", "40"], "exceeds the context"),
    (["--prompt", "def", "--top_p", "0"], "top_p"),
    (["--prompt", "def", "--top_p", "1.5"], "top_p"),
    (["--prompt", "def", "--temperature", "-1"], "temperature"),
    (["--prompt", "def", "--top_k", "0"], "top_k"),
    (["--prompt", "def", "--top_k", "100000"], "top_k"),
    (["--prompt", "def", "--beams", "0"], "beams"),
    (["--prompt", "def", "--beams", "2", "--temperature", "0.5"], "deterministic"),
    (["--prompt", "def", "--num_samples", "2"], "repeat one text"),
])
def test_bad_generate_input_is_one_clear_line(capsys, workdir, args, words):
  status, out, err = _cli(capsys, "generate", "--workdir", str(workdir), *args)
  assert status == 2 and out == ""
  message = [line for line in err.splitlines() if line.startswith("llm-jax: error:")]
  assert len(message) == 1 and words in message[0]


def test_the_library_names_parameters_and_the_command_line_its_flags(capsys, run, workdir):
  for call, name in ((lambda: run.generate("def", 4, temperature=1.0, top_k=0), "top_k=0"),
                     (lambda: run.next_token_distribution("def", top=0), "top=0"),
                     (lambda: run.evaluate(max_tokens=-1), "max_tokens=-1")):
    with pytest.raises(UserError) as error:
      call()
    assert name in str(error.value) and "--" not in str(error.value)
  for args, flag in ((["generate", "--prompt", "def", "--temperature", "1", "--top_k", "0"],
                      "--top_k=0"), (["predict", "--prompt", "def", "--top", "0"], "--top=0"),
                     (["eval", "--max_tokens", "-1"], "--max_tokens=-1")):
    status, _, err = _cli(capsys, *args[:1], "--workdir", str(workdir), *args[1:])
    assert status == 2 and flag in err, err


def test_a_workdir_without_a_checkpoint_is_refused(capsys, tmp_path):
  for command in (["generate", "--prompt", "x"], ["predict", "--prompt", "x"], ["eval"]):
    status, _, err = _cli(capsys, *command, "--workdir", str(tmp_path))
    assert status == 2 and "has no checkpoint" in err
  assert list(tmp_path.iterdir()) == []


def test_predict_table_sums_to_one_with_the_rest(capsys, run, workdir, tmp_path):
  plot = tmp_path / "next.png"
  status, out, _ = _cli(capsys, "predict", "--workdir", str(workdir), "--prompt", "import ",
                        "--top", "7", "--plot", str(plot))
  assert status == 0
  lines = out.splitlines()[1:]
  assert len(lines) == 8 and "rest (505 tokens)" in lines[-1]
  probabilities = [float(line.split()[-1]) for line in lines]
  assert probabilities[:7] == sorted(probabilities[:7], reverse=True)
  assert abs(sum(probabilities) - 1.0) < 1e-5  # printed with 6 decimals
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The listed tokens are the most likely ones, and the rest is the mass of all the others.
  probs = generate_lib.next_token_probs(run.params, run.model, [run.encode_prompt("import ")])
  top7 = np.sort(probs[0])[::-1][:7]
  np.testing.assert_allclose(probabilities[:7], top7, atol=1e-6)
  distribution = run.next_token_distribution("import ", top=7)
  np.testing.assert_allclose(distribution.rest, np.sort(probs[0])[:-7].sum(), rtol=1e-6)


def test_eval_equals_exp_of_the_mean_token_loss_computed_independently(run, tmp_path):
  texts = ["def add(a, b):\n    return a + b  # naïve\n", "x = [i * i for i in range(10)]\n",
           "class Point:\n    pass\n" * 8]  # the last is longer than one context row
  for i, text in enumerate(texts):
    (tmp_path / f"doc{i}.txt").write_text(text)
  result = run.evaluate(str(tmp_path / "*.txt"))
  losses = []
  for text in texts:
    ids = [run.tokenizer.bos_id, *run.tokenizer.encode(text), run.tokenizer.eos_id]
    context = run.model.config.context_length
    # Rows of context + 1 tokens overlapping by one, each scored on its own.
    for start in range(0, len(ids) - 1, context):
      row = ids[start:start + context + 1]
      logits = run.model.apply({"params": run.params}, np.asarray([row[:-1]]))[0]
      log_probs = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
      losses += [-log_probs[t, row[t + 1]] for t in range(len(row) - 1)]
  assert max(len(t) for t in texts) > run.model.config.context_length  # really crosses rows
  assert result["tokens"] == len(losses) and result["documents"] == 3
  np.testing.assert_allclose(result["loss"], np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(result["perplexity"], math.exp(np.mean(losses)), rtol=1e-5)
  num_bytes = sum(len(t.encode()) for t in texts)
  assert num_bytes > sum(len(t) for t in texts)  # bytes, not characters
  np.testing.assert_allclose(result["bits_per_byte"], np.sum(losses) / math.log(2) / num_bytes,
                             rtol=1e-5)


def test_eval_command_on_the_validation_split(capsys, workdir):
  status, out, _ = _cli(capsys, "eval", "--workdir", str(workdir), "--json")
  assert status == 0
  result = json.loads(out)
  assert result["documents"] > 0 and result["tokens"] > 0
  assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)
  assert 0 < result["loss"] < math.log(512) + 1
  status, _, err = _cli(capsys, "eval", "--workdir", str(workdir), "--files", "/nonexistent/*")
  assert status == 2 and "matches no files" in err


def test_mesh_override_and_bad_overrides(capsys, workdir, run):
  sharded = load_run(workdir, ["mesh.fsdp=2", "mesh.tensor=4"])
  assert dict(sharded.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert sharded.generate(["def ", "import os"], 6) == run.generate(["def ", "import os"], 6)
  with pytest.raises(UserError, match="Only --config.mesh"):
    load_run(workdir, ["model.d_model=8"])


def test_streamed_text_joins_into_the_generated_text(run):
  for temperature in (0.0, 0.9):
    pieces = list(run.stream("def main():", 20, temperature=temperature, seed=5))
    assert len(pieces) > 1  # it streams, piece by piece
    assert "".join(pieces) == run.generate("def main():", 20, temperature=temperature,
                                           seed=5)[0][0]
