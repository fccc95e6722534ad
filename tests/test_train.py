"""End to end through the training loop on a tiny model and a small files corpus."""

import json
import math

import pytest

from llm_jax import cli
from llm_jax.errors import UserError
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
  _, workdir, summary = trained
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
  assert summary["sample"].startswith("def ")


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


def test_tokenizer_of_another_size_is_refused(trained, text_corpus, tmp_path):
  _, workdir, _ = trained
  config = tiny_config(f"data.source=files:{text_corpus}/*.py", "model.vocab_size=1024",
                       f"data.tokenizer={workdir / 'tokenizer.model'}")
  with pytest.raises(UserError, match="512 pieces but model.vocab_size=1024"):
    train(config, tmp_path / "new")


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
