"""The command layer: bad paths fail at once in one line, options reach the library only when
given (so the library's and the config's defaults apply), and `--help` starts no JAX."""

import argparse
import json
import subprocess
import sys

import pytest

from llm_jax import cli, paths
from llm_jax.errors import UserError

from conftest import snapshot

SWEEP_FILE = "configs/sweeps/isoflop_cpu.py"


def _one_error_line(capsys) -> str:
  captured = capsys.readouterr()
  assert captured.out == ""
  [line] = captured.err.strip().splitlines()
  assert line.startswith("llm-jax: error: ")
  return line


@pytest.mark.parametrize("argv, option", [
    (["train", "--workdir", "{file}"], "--workdir"),
    (["train", "--workdir", "{file}/run"], "--workdir"),
    (["sweep", SWEEP_FILE, "--sweep_dir", "{file}", "--dry-run"], "--sweep_dir"),
    (["scaling", "fit", "{dir}", "--out", "{file}"], "--out"),
    (["data", "prepare", "--files", "{dir}/*", "--name", "x", "--data_dir", "{file}"],
     "--data_dir"),
    (["tokenizer", "train", "--vocab_size", "512", "--out", "{dir}"], "--out"),
    (["tokenizer", "train", "--vocab_size", "512", "--out", "{file}/tok.model"], "--out"),
    (["bench", "--out", "{dir}"], "--out"),
    (["bench", "--out", "{file}/bench.json"], "--out"),
    (["predict", "--workdir", "{dir}", "--prompt", "x", "--plot", "{dir}"], "--plot"),
    (["predict", "--workdir", "{dir}", "--prompt", "x", "--plot", "{file}/p.png"], "--plot"),
    (["generate", "--workdir", "{dir}", "--prompt_file", "{dir}"], "--prompt_file"),
])
def test_a_path_of_the_wrong_kind_is_one_line_before_any_work(argv, option, tmp_path, capsys):
  (tmp_path / "file").write_text("precious\n")
  (tmp_path / "dir").mkdir()
  before = snapshot(tmp_path)
  argv = [a.format(file=tmp_path / "file", dir=tmp_path / "dir") for a in argv]
  assert cli.main(argv) == 2
  line = _one_error_line(capsys)
  assert option in line and str(tmp_path) in line, line
  assert snapshot(tmp_path) == before and (tmp_path / "dir").is_dir()


def _options(parser, command=()):
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, subparser in action.choices.items():
        yield from _options(subparser, (*command, name))
    elif action.option_strings and action.dest != "help":
      yield " ".join(command), action


def test_no_option_holds_a_copy_of_a_library_or_config_default():
  defaults = {(command, action.dest): action.default
              for command, action in _options(cli.build_parser())
              if action.default not in (None, False)}
  assert defaults == {("train", "workdir"): "runs/default", ("sweep", "only"): []}


class _Recorder:
  """Stands in for a library function (or a run and its methods): records the call, then
  stops the command with a UserError."""

  def __init__(self):
    self.calls = []

  def __call__(self, *args, **kwargs):
    self.calls.append((args, kwargs))
    raise UserError("recorded")

  def __getattr__(self, name):
    return self


@pytest.mark.parametrize("argv, target, kwargs", [
    (["generate", "--workdir", "w", "--prompt", "p"], "llm_jax.cli.inference._load_run", {}),
    (["generate", "--workdir", "w", "--prompt", "p", "--max_new_tokens", "5", "--temperature",
      "0.5", "--top_k", "3", "--top_p", "0.9", "--beams", "1", "--length_penalty", "0.5",
      "--num_samples", "2", "--seed", "7", "--batch_size", "4"],
     "llm_jax.cli.inference._load_run",
     {"max_new_tokens": 5, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "beams": 1,
      "length_penalty": 0.5, "num_samples": 2, "seed": 7, "batch_size": 4}),
    (["predict", "--workdir", "w", "--prompt", "p", "--top", "3"],
     "llm_jax.cli.inference._load_run", {"top": 3}),
    (["eval", "--workdir", "w", "--max_tokens", "9", "--batch_size", "2"],
     "llm_jax.cli.inference._load_run", {"max_tokens": 9, "batch_size": 2}),
    (["bench", "--train_only"], "llm_jax.tools.bench.measure", {"inference": False}),
    (["bench", "--steps", "3"], "llm_jax.tools.bench.measure", {"steps": 3, "inference": True}),
    (["data", "bench", "--batches", "7"], "llm_jax.data.bench.measure", {"batches": 7}),
    (["plan", "--devices", "1", "--mfu", "0.5"], "llm_jax.tools.plan.plan",
     {"target_mfu": 0.5, "xla_flops": True}),
    (["scaling", "fit", "s", "--out", "{out}", "--draws", "3", "--seed", "1", "--loss",
      "train_loss", "--params", "params_non_embedding"], "llm_jax.tools.scaling.fit_and_plot",
     {"overwrite": False, "draws": 3, "seed": 1, "loss_key": "train_loss",
      "params_key": "params_non_embedding"}),
])
def test_only_the_options_given_reach_the_library(argv, target, kwargs, tmp_path, monkeypatch,
                                                  capsys):
  recorder = _Recorder()
  monkeypatch.setattr(target, (lambda *_: recorder) if target.endswith("_load_run")
                      else recorder)
  assert cli.main([a.format(out=tmp_path / "fit") for a in argv]) == 2
  assert "recorded" in capsys.readouterr().err
  [(_, called_with)] = recorder.calls
  assert called_with == kwargs


def test_options_named_after_config_keys_override_only_when_given(tmp_path, monkeypatch):
  recorder = _Recorder()
  monkeypatch.setattr("llm_jax.data.sources.open_sources", recorder)
  cli.main(["tokenizer", "train", "--vocab_size", "400", "--out", str(tmp_path / "t.model"),
            "--sample_bytes", "1000", "--source", "files:x/*"])
  monkeypatch.setattr("llm_jax.data.tfds_source.prepare", recorder)
  cli.main(["data", "prepare", "--files", "x/*", "--name", "x", "--data_dir", str(tmp_path),
            "--val_fraction", "0.25"])
  [((data,), _), ((_, _, _, text_key, val_fraction), _)] = recorder.calls
  assert (data.tokenizer_sample_bytes, data.source, data.text_key) == (1000, "files:x/*", "text")
  assert (text_key, val_fraction) == ("text", 0.25)


def test_data_bench_against_reads_the_run_before_measuring(tmp_path, monkeypatch, capsys):
  recorder = _Recorder()
  monkeypatch.setattr("llm_jax.data.bench.measure", recorder)
  assert cli.main(["data", "bench", "--against", str(tmp_path)]) == 2
  assert "metrics.jsonl does not exist" in _one_error_line(capsys)
  (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n\n')
  assert cli.main(["data", "bench", "--against", str(tmp_path)]) == 2
  assert "no tokens_per_sec rows" in _one_error_line(capsys)
  assert recorder.calls == []
  rows = [{"step": 10, "tokens_per_sec": 100.0}, {"step": 20, "tokens_per_sec": 300.0},
          {"step": 30, "tokens_per_sec": 200.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  monkeypatch.setattr("llm_jax.data.bench.measure", lambda *_: {"tokens_per_sec": 1000.0})
  assert cli.main(["data", "bench", "--against", str(tmp_path), "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["train_tokens_per_sec"] == 200.0 and result["feed_ratio"] == 5.0


def test_help_imports_no_jax():
  code = ("import sys\nfrom llm_jax import cli\ntry:\n  cli.main(['--help'])\n"
          "except SystemExit as e:\n  assert e.code == 0\n"
          "assert 'jax' not in sys.modules, 'llm-jax --help imported JAX'\n")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_undoing_a_refused_run_removes_only_what_it_made(tmp_path):
  existing = tmp_path / "existing"
  (existing / "kept").mkdir(parents=True)
  (existing / "notes.txt").write_text("mine")
  undo_existing = paths.undo_new_entries(existing)
  undo_new = paths.undo_new_entries(tmp_path / "new" / "run")
  for made in (existing, tmp_path / "new" / "run"):
    (made / "checkpoints").mkdir(parents=True)
    (made / "tokenizer.model").write_bytes(b"x")
  (existing / "kept" / "inside").write_text("an entry of an old directory is not this run's")
  undo_existing()
  undo_new()
  assert sorted(p.name for p in existing.iterdir()) == ["kept", "notes.txt"]
  assert (existing / "notes.txt").read_text() == "mine"
  assert not (tmp_path / "new").exists()  # the parent it made goes too
