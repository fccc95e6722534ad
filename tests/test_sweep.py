"""Sweeps: grid helpers, FLOPs budgets, checks before training, skip and resume of members."""

import json
import os
import pathlib
import shlex
import signal
import textwrap

import pytest

import conftest
from llm_jax import cli, config as config_lib
from llm_jax.model import flops
from llm_jax.tools import sweep
from llm_jax.errors import UserError

TINY = dict(o.split("=", 1) for o in conftest.TINY_OVERRIDES)


def test_grid_is_the_cartesian_product_in_order():
  assert sweep.grid(a=[1, 2], b=["x", "y", "z"]) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]


def test_zipped_pairs_values_and_product_merges_groups():
  sizes = sweep.zipped(**{"model.d_model": [64, 128], "model.num_layers": [2, 4]})
  assert sizes == [{"model.d_model": 64, "model.num_layers": 2},
                   {"model.d_model": 128, "model.num_layers": 4}]
  members = sweep.product(sweep.grid(lr=[1e-3, 3e-3]), sizes)
  assert len(members) == 4
  assert members[1] == {"lr": 1e-3, "model.d_model": 128, "model.num_layers": 4}
  assert sweep.model_shapes([(64, 2, 4, 2, 128)]) == [
      {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
       "model.num_kv_heads": 2, "model.mlp_dim": 128}]
  with pytest.raises(UserError, match="same number of values"):
    sweep.zipped(a=[1, 2], b=[1])
  with pytest.raises(UserError, match="two groups"):
    sweep.product(sweep.grid(a=[1]), sweep.grid(a=[2]))


def test_named_members_need_unique_names():
  members = sweep.grid(**{"model.d_model": [64, 128]}, lr=[0.5])
  assert list(sweep.named(members)) == ["d_model=64-lr=0.5", "d_model=128-lr=0.5"]
  assert list(sweep.named(members, "d{d_model}")) == ["d64", "d128"]
  with pytest.raises(UserError, match="both named"):
    sweep.named(members, "same")


def _tiny_sweep(members, **overrides):
  return sweep.Sweep(members=members, overrides={**TINY, **overrides})


def test_budget_sets_steps_and_warmup_from_flops_per_token(tmp_path):
  config = conftest.tiny_config()
  step_flops = flops.flops_per_token(config.model) * 8 * 32  # batch 8 x context 32
  spec = _tiny_sweep({"big": {sweep.BUDGET_KEY: 40.7 * step_flops},
                      "small": {sweep.BUDGET_KEY: 400 * step_flops}}, **{"train.steps": 999})
  spec.warmup_fraction = 0.1
  big, small = sweep.resolve(spec, tmp_path, 8)
  assert (big.config.train.steps, big.config.train.warmup_steps) == (40, 4)
  assert (small.config.train.steps, small.config.train.warmup_steps) == (400, 40)
  assert small.cost()["flops"] == pytest.approx(400 * step_flops)
  with pytest.raises(UserError, match="smaller than one step"):
    sweep.resolve(_tiny_sweep({"x": {sweep.BUDGET_KEY: 0.5 * step_flops}}), tmp_path, 8)


def test_printed_commands_rebuild_each_members_config(tmp_path):
  spec = _tiny_sweep(sweep.named(sweep.grid(**{"train.learning_rate": [1e-3, 2e-3]})))
  members = sweep.resolve(spec, tmp_path, 8)
  assert [m.name for m in sweep.select(members, ["learning_rate=0.002"])] == [
      "learning_rate=0.002"]
  with pytest.raises(UserError, match="not a member"):
    sweep.select(members, ["learning_rate=0.5"])
  for member in members:
    words = shlex.split(sweep.train_command(member, spec.base))
    assert words[:2] == ["llm-jax", "train"] and words[-2:] == ["--workdir", str(member.workdir)]
    rebuilt = config_lib.load_config(None, [w.removeprefix("--") for w in words[2:-2]])
    assert rebuilt.to_dict() == member.config.to_dict()


def _write_sweep_file(path, members: dict, **overrides) -> str:
  path.write_text(textwrap.dedent(f"""\
      from llm_jax.tools import sweep
      def get_sweep():
        return sweep.Sweep(members={members!r}, overrides={({**TINY, **overrides})!r})
      """))
  return str(path)


def test_unknown_key_in_any_member_is_refused_before_anything_runs(tmp_path, capsys):
  members = {"a": {"model.d_model": 64}, "b": {"model.d_model": 64},
             "c": {"model.d_modle": 64}}
  sweep_file = _write_sweep_file(tmp_path / "bad.py", members)
  assert cli.main(["sweep", sweep_file, "--sweep_dir", str(tmp_path / "out")]) == 2
  error = capsys.readouterr().err
  assert "'c'" in error and "model.d_modle" in error and "d_model" in error
  assert not (tmp_path / "out").exists()


def test_sweep_file_without_get_sweep_is_one_sentence(tmp_path, capsys):
  (tmp_path / "empty.py").write_text("X = 1\n")
  assert cli.main(["sweep", str(tmp_path / "empty.py"), "--dry-run"]) == 2
  assert "defines no get_sweep()" in capsys.readouterr().err


def _rows(sweep_dir):
  return {row["name"]: row for row in map(json.loads, (sweep_dir / "sweep.jsonl").open())}


def test_sweep_runs_skips_finished_and_resumes_interrupted_members(tmp_path, monkeypatch,
                                                                   text_corpus):
  from llm_jax.train import loop
  config = conftest.tiny_config()
  step_flops = flops.flops_per_token(config.model) * 8 * 32
  members = {"d64": {}, "lr2": {"train.learning_rate": 2e-3},
             "budget": {sweep.BUDGET_KEY: 8.5 * step_flops}}  # 8 steps
  spec = _tiny_sweep(members, **{
      "train.steps": 6, "train.log_every": 2, "train.eval_every": 0, "train.eval_tokens": 256,
      "train.checkpoint_every": 0, "train.sample_tokens": 0,
      "data.source": f"files:{text_corpus}/*.py", "data.tokenizer_sample_bytes": 200_000})
  sweep_dir = tmp_path / "sweep"
  resolved = sweep.resolve(spec, sweep_dir, 8)

  # First run: the third member gets SIGTERM mid-run, as from a scheduler preempting the job
  # (sent when step 4's metrics are written, one step late); train() stops after the current
  # step with a checkpoint and returns.
  write = loop.MetricsWriter.write

  def preempting_write(self, step, values):
    write(self, step, values)
    if "budget" in str(self.path) and step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "write", preempting_write)
  sweep.run(spec, resolved, sweep_dir)
  rows = _rows(sweep_dir)
  assert [rows[n]["status"] for n in members] == ["finished", "finished", "interrupted"]
  stopped_at = rows["budget"]["steps_done"]
  assert 4 <= stopped_at < 8 and rows["budget"]["steps"] == 8
  assert not (sweep_dir / "budget" / sweep.RESULT_FILE).exists()
  first = {n: (sweep_dir / n / sweep.RESULT_FILE).read_text() for n in ("d64", "lr2")}
  for name in ("d64", "lr2"):
    assert rows[name]["params"] == flops.param_counts(config.model)["params"]
    assert rows[name]["tokens"] == 6 * 8 * 32
    assert rows[name]["val_loss"] > 0 and rows[name]["train_loss"] > 0
  assert rows["d64"]["val_loss"] != rows["lr2"]["val_loss"]  # the override took effect

  # Second run: finished members are skipped (train() is never called for them) and the
  # interrupted one resumes from the checkpoint written when it stopped.
  monkeypatch.setattr(loop.MetricsWriter, "write", write)
  trained = []
  real_train = loop.train
  monkeypatch.setattr(loop, "train", lambda c, w: trained.append(w.name) or real_train(c, w))
  sweep.run(spec, resolved, sweep_dir)
  assert trained == ["budget"]
  rows = _rows(sweep_dir)
  assert all(row["status"] == "finished" for row in rows.values())
  assert {n: (sweep_dir / n / sweep.RESULT_FILE).read_text() for n in first} == first
  attempts = [json.loads(line) for line in (sweep_dir / "budget" / sweep.ATTEMPTS_FILE).open()]
  assert [(a["start_step"], a["end_step"]) for a in attempts] == [(0, stopped_at), (stopped_at, 8)]
  assert rows["budget"]["wall_s"] == pytest.approx(sum(a["wall_s"] for a in attempts))
  logged = [json.loads(line)["step"] for line in (sweep_dir / "budget" / "metrics.jsonl").open()]
  assert logged == [2, 4, 6, 8]  # each step logged once: resumed, not restarted

  # Third run: nothing left to train.
  trained.clear()
  sweep.run(spec, resolved, sweep_dir)
  assert trained == []


@pytest.mark.parametrize("path", sorted(
    str(p) for p in (pathlib.Path(__file__).parents[1] / "configs/sweeps").glob("*.py")))
def test_shipped_sweeps_resolve_with_sizes_around_each_budget(path, tmp_path):
  members = sweep.resolve(sweep.load_sweep(path), tmp_path, 8)
  budgets = {}
  for member in members:
    budgets.setdefault(member.overrides[sweep.BUDGET_KEY], []).append(member.cost()["params"])
  assert len(budgets) >= 3
  assert all(len(set(sizes)) >= 5 for sizes in budgets.values())


def test_cli_prints_the_tokenizer_then_one_command_per_chosen_member(tmp_path, capsys):
  members = {"a": {"model.d_model": 64}, "b": {"model.d_model": 128}}
  sweep_file = _write_sweep_file(tmp_path / "two.py", members)
  out = str(tmp_path / "out")
  assert cli.main(["sweep", sweep_file, "--sweep_dir", out, "--print-commands"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("llm-jax tokenizer train ") and f"{out}/tokenizer.model" in lines[0]
  assert [line.split()[-1] for line in lines[1:]] == [f"{out}/a", f"{out}/b"]
  assert all(f"--config.data.tokenizer={out}/tokenizer.model" in line for line in lines[1:])
  assert cli.main(["sweep", sweep_file, "--sweep_dir", out, "--print-commands",
                   "--only", "b"]) == 0
  assert capsys.readouterr().out.splitlines()[1:] == lines[2:]
  assert not (tmp_path / "out").exists()  # printing writes nothing
