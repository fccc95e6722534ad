"""`llm-jax bench`: well-formed output for a tiny config; nothing already written is replaced."""

import json

from llm_jax import cli

from conftest import TINY_OVERRIDES

_POSITIVE_KEYS = (
    "compile_time_sec", "step_time_sec", "tokens_per_sec", "flops_per_token",
    "achieved_flops_per_sec", "peak_flops_per_sec", "mfu", "prefill_time_sec",
    "prefill_tokens_per_sec", "decode_b1_tokens_per_sec", "decode_b8_tokens_per_sec",
    "decode_b1_token_time_sec", "decode_b8_token_time_sec", "decode_b32_tokens_per_sec",
    "decode_b8_sampled_tokens_per_sec", "decode_b1_compile_time_sec")


def test_bench_json_output_is_one_well_formed_object(tmp_path, capsys):
  out = tmp_path / "bench.json"
  argv = ["bench", "--steps", "2", "--json", "--out", str(out),
          *[f"--config.{o}" for o in TINY_OVERRIDES]]
  assert cli.main(argv) == 0
  printed = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout
  assert printed == json.loads(out.read_text())
  for key in _POSITIVE_KEYS:
    assert printed[key] > 0, key
  assert printed["steps"] == 2
  # A second run refuses to overwrite the result it would write.
  assert cli.main(argv) == 2
  assert json.loads(out.read_text()) == printed


def test_bench_text_output_names_the_numbers(capsys):
  argv = ["bench", "--steps", "1", "--train_only", *[f"--config.{o}" for o in TINY_OVERRIDES]]
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  assert "tokens/s" in text and "MFU" in text and "compile" in text
  assert "decode" not in text


def test_bench_refuses_bad_arguments(capsys):
  assert cli.main(["bench", "--steps", "0"]) == 2
  assert "--steps=0" in capsys.readouterr().err
