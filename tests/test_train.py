"""End to end through the training loop on a tiny model and a small files corpus."""

import json
import math

import jax
import numpy as np
import pytest

from llm_jax import cli
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.cli.train import end_of_run_sample
from llm_jax.train.loop import train

from conftest import snapshot, tiny_config


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# Trained with bfloat16 matmul operands, the CPU default where the CPU has bf16 dots.
BF16 = "model.matmul_precision=bfloat16"


@pytest.fixture(scope="module")
def trained(text_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(f"data.source=files:{text_corpus}/*.py", BF16)
  summary = train(config, workdir)
  return config, workdir, summary


def test_run_directory_and_metrics(trained):
  config, workdir, summary = trained
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "checkpoints/30"):
    assert (workdir / name).exists(), name
  assert list((workdir / "tensorboard").iterdir())
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  for row in rows:
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"} <= row.keys()
    assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
  assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
  assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
  assert end_of_run_sample(config, workdir).startswith("def ")


def test_loss_falls(trained):
  config, workdir, _ = trained
  rows = _rows(workdir)
  assert rows[0]["loss"] < math.log(config.model.vocab_size) + 0.5  # sane start
  assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
  val = [r["val_loss"] for r in rows if "val_loss" in r]
  assert val[-1] < val[0]


def test_resume_continues_without_duplicate_rows(trained, text_corpus):
  config, workdir, _ = trained
  longer = tiny_config(f"data.source=files:{text_corpus}/*.py", BF16, "train.steps=40")
  train(longer, workdir)
  steps = [r["step"] for r in _rows(workdir)]
  assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
  assert (workdir / "checkpoints" / "40").exists()


@pytest.mark.parametrize("change, words", [
    ("model.num_layers=3", "model.num_layers: 2 -> 3"),
    ("train.batch_size=16", "another data layout"),
])
def test_incompatible_resume_is_refused_and_nothing_changes(trained, text_corpus, change,
                                                            words):
  _, workdir, _ = trained
  before = snapshot(workdir)
  other = tiny_config(f"data.source=files:{text_corpus}/*.py", change)
  with pytest.raises(UserError, match=words):
    train(other, workdir)
  assert snapshot(workdir) == before


def test_tokenizer_larger_than_the_model_is_refused_and_a_smaller_one_used(
    trained, text_corpus, tmp_path):
  _, workdir, _ = trained
  given = f"data.tokenizer={workdir / 'tokenizer.model'}"  # 512 pieces
  larger = tiny_config(f"data.source=files:{text_corpus}/*.py", "model.vocab_size=384", given)
  with pytest.raises(UserError, match="512 pieces but model.vocab_size=384; set "
                                      "--config.model.vocab_size=512 or more"):
    train(larger, tmp_path / "new")
  padded = tiny_config("model.vocab_size=1024", given)  # an embedding with 512 spare rows
  assert tokenizer_lib.for_run(padded, []).vocab_size == 512


@pytest.mark.parametrize("args, words", [
    (["--config.model.num_heads=6"], "model.num_heads=6"),
    (["--config.model.nmu_layers=2"], "model.num_layers"),
    (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "devices"),
    (["--config.data.source=files:/nonexistent/*.txt"], "matches no files"),
    (["--bogus"], "Unknown argument"),
])
def test_cli_bad_input_exits_2_with_one_line(args, words, tmp_path, capsys):
  code = cli.main(["train", "--workdir", str(tmp_path / "w"), *args])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("llm-jax: error:")]
  assert code == 2
  assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
  assert not (tmp_path / "w" / "checkpoints").exists()


# --- train.init_from --------------------------------------------------------------------------

def _params(workdir):
  from llm_jax.inference.run import load_run
  return jax.device_get(load_run(workdir).params)


def test_init_from_starts_a_new_run_from_the_parameters_only(trained, text_corpus, tmp_path):
  _, source, _ = trained
  before = snapshot(source)
  new = tmp_path / "continued"
  # Continued pretraining at a longer context with another RoPE base keeps every shape.
  train(tiny_config(f"data.source=files:{text_corpus}/*.py", BF16, "train.steps=5",
                              "train.warmup_steps=1", "train.learning_rate=1e-9",
                              "model.context_length=64", "model.rope_theta=20000",
                              "train.sample_tokens=0", f"train.init_from={source}"), new)
  assert snapshot(source) == before  # the source run is only read
  saved = json.loads((new / "config.json").read_text())
  newest = max(int(p.name) for p in (source / "checkpoints").iterdir() if p.name.isdigit())
  assert saved["train"]["init_from"] == str((source / "checkpoints" / str(newest)).absolute())
  assert (new / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
  # A learning rate of 1e-9 leaves the parameters where they started: the source's.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), _params(new),
               _params(source))
  rows = _rows(new)
  assert [r["step"] for r in rows] == [5]  # from step 0, with a fresh schedule
  assert rows[0]["loss"] < _rows(source)[0]["loss"] - 0.5  # not where a random model starts


def test_init_from_initialises_a_new_head_fresh_and_names_it(trained, text_corpus, tmp_path,
                                                              capsys):
  _, source, _ = trained
  train(tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=2",
                    "train.warmup_steps=1", "train.sample_tokens=0",
                    "model.tie_embeddings=false", f"train.init_from={source}"), tmp_path / "n")
  assert "kept its fresh initialisation: lm_head" in capsys.readouterr().err


@pytest.mark.parametrize("change, words", [
    ("model.d_model=128", "model.d_model: 64 -> 128"),
    ("model.num_layers=3", "model.num_layers: 2 -> 3"),
])
def test_init_from_refuses_other_shapes_naming_the_keys(trained, text_corpus, tmp_path, change,
                                                       words):
  _, source, _ = trained
  before = snapshot(source)
  with pytest.raises(UserError, match=words):
    train(tiny_config(f"data.source=files:{text_corpus}/*.py", change,
                      f"train.init_from={source}"), tmp_path / "n")
  assert snapshot(source) == before
  assert not (tmp_path / "n").exists()  # refused before anything was written


def test_init_from_a_directory_without_checkpoints_exits_2(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  code = cli.main(["train", "--workdir", str(tmp_path / "w"),
                   f"--config.train.init_from={tmp_path / 'empty'}"])
  err = capsys.readouterr().err
  assert code == 2 and "not a run directory with checkpoints" in err and "Traceback" not in err
