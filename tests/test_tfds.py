"""TFDS: `llm-jax data prepare` writes a real ArrayRecord dataset; `tfds:` sources read it."""

import json

import pytest

from llm_jax import cli
from llm_jax.data import pipeline, sources, tfds_source
from llm_jax.errors import UserError

from conftest import data_config


def _all(documents):
  return [documents[i] for i in range(len(documents))]


@pytest.fixture(scope="module")
def prepared(text_corpus, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  code = cli.main(["data", "prepare", "--files", f"{text_corpus}/*.py", "--name", "local_text",
                   "--data_dir", str(data_dir), "--val_fraction", "0.2"])
  assert code == 0
  return data_dir


def test_prepared_dataset_round_trips_the_local_corpus(prepared, text_corpus):
  assert list((prepared / "local_text" / "1.0.0").glob("*.array_record*"))
  files = sources.open_source(f"files:{text_corpus}/*.py", data_config("val_fraction=0.2"))
  tfds = sources.open_source("tfds:local_text", data_config(f"tfds_data_dir={prepared}"))
  assert "validation from its 'validation' split" in tfds.description
  # TFDS shuffles records when it writes them; the documents are the same.
  assert sorted(_all(tfds.train)) == sorted(_all(files.train))
  assert sorted(_all(tfds.validation)) == sorted(_all(files.validation))
  assert len(tfds.validation) > 0


def test_tfds_source_feeds_the_pipeline(prepared, tokenizer):
  source = sources.open_source("tfds:local_text:train",
                               data_config(f"tfds_data_dir={prepared}"))
  iterator = iter(pipeline.training_dataset([(source.train, 1.0)], tokenizer, 32, 8, seed=0))
  batch = next(iterator)
  assert batch["inputs"].shape == (8, 32) and batch["weights"].sum() > 0


def test_split_without_validation_holds_out_records(prepared):
  source = sources.open_source("tfds:local_text:validation",
                               data_config(f"tfds_data_dir={prepared}", "val_fraction=0.25"))
  # 'validation' is the training split here, and there is no other split to validate on.
  assert "every 4th record" in source.description
  everything = _all(sources.open_source("tfds:local_text", data_config(
      f"tfds_data_dir={prepared}")).validation)
  assert sorted(_all(source.train) + _all(source.validation)) == sorted(everything)


@pytest.mark.parametrize("spec, words", [
    ("tfds:no_such_dataset_here", "neither known to TFDS nor prepared"),
    ("tfds:local_text:dev", "has no split 'dev'"),
    ("tfds:", "names no dataset"),
])
def test_bad_tfds_specs(prepared, spec, words):
  with pytest.raises(UserError, match=words):
    sources.open_source(spec, data_config(f"tfds_data_dir={prepared}"))


def test_wrong_text_key(prepared):
  with pytest.raises(UserError, match=r"no feature 'body'; its features are \['text'\]"):
    sources.open_source("tfds:local_text", data_config(f"tfds_data_dir={prepared}",
                                                        "text_key=body"))


def test_data_dir_without_prepared_data(tmp_path):
  # lm1b is a dataset TFDS knows, but nothing is prepared in an empty directory.
  with pytest.raises(UserError, match="no prepared data"):
    sources.open_source("tfds:lm1b", data_config(f"tfds_data_dir={tmp_path}"))


def test_prepare_refuses_to_overwrite_and_bad_names(prepared, text_corpus):
  before = sorted(p.name for p in (prepared / "local_text" / "1.0.0").iterdir())
  with pytest.raises(UserError, match="already exists"):
    tfds_source.prepare(f"{text_corpus}/*.py", "local_text", str(prepared), "text", 0.2)
  assert sorted(p.name for p in (prepared / "local_text" / "1.0.0").iterdir()) == before
  with pytest.raises(UserError, match="not a TFDS dataset name"):
    tfds_source.prepare(f"{text_corpus}/*.py", "Bad-Name", str(prepared), "text", 0.2)


def test_prepare_from_jsonl(tmp_path):
  lines = [json.dumps({"text": f"record number {i} " * 5}) for i in range(30)]
  (tmp_path / "data.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
  corpus = tfds_source.prepare(str(tmp_path / "*.jsonl"), "records", str(tmp_path / "out"),
                               "text", 0.2)
  assert corpus.skipped["not JSON"] == 1
  source = sources.open_source("tfds:records", data_config(f"tfds_data_dir={tmp_path / 'out'}"))
  assert len(source.train) + len(source.validation) == 30
