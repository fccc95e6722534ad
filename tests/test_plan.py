"""The planner: counts against formula and published totals, memory against the mesh, errors."""

import json

import jax
import pytest

from llm_jax import cli
from llm_jax.model import flops
from llm_jax.parallel import hardware
from llm_jax import config as config_lib
from llm_jax.tools import plan
from llm_jax.errors import UserError

from conftest import tiny_config

# Published totals (model cards / Hugging Face configs of the released weights).
PUBLISHED = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
             "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248,
             "llama3-70b": 70_553_706_496}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_model_counts_equal_the_formula_and_the_published_totals(preset):
  config = config_lib.load_config(f"configs/llama.py:{preset}")
  counted = plan.model_param_counts(config)  # from the model's own (abstract) parameter tree
  formula = flops.param_counts(config.model)
  assert counted["params"] == formula["params"] == PUBLISHED[preset]
  assert counted["params_non_embedding"] == formula["params_non_embedding"]


def _small(*overrides):
  """Parameters large enough next to activations that sharding them shows in the totals."""
  return tiny_config("model.d_model=256", "model.mlp_dim=1024", "model.vocab_size=2048",
                     *overrides)


@pytest.mark.parametrize("hardware_name, dtype", [(None, "float32"), ("tpu-v5p", "bfloat16"),
                                                  ("h100", "bfloat16")])
def test_the_plan_makes_auto_choices_as_the_accelerator_would(hardware_name, dtype):
  accelerator = hardware.by_name(hardware_name) if hardware_name else None
  config = plan.for_accelerator(_small("model.matmul_precision=auto", "model.attention=auto",
                                       f"model.dtype={dtype}"), accelerator)
  # cuDNN (the H100's choice for bfloat16) cannot compile on CPU; XLA's attention stands in.
  assert (config.model.attention, config.model.scan_unroll,
          config.model.matmul_precision) == ("xla", 1, "float32")
  assert _small().model.attention == "auto"  # the caller's config is left as it was


def test_plan_of_a_small_config_reports_counts_flops_and_memory():
  mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.num_layers=3"]
  config = _small(*mesh)
  result = plan.plan(config, 8, "h100", target_mfu=0.5)
  assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert result["params"] == result["params_in_model"]["params"] == flops.param_counts(
      config.model)["params"]
  tokens = config.train.batch_size * config.model.context_length
  assert result["flops_per_step"] == flops.flops_per_token(config.model) * tokens
  # XLA counts a loop body once, so its count of the scanned layers is extrapolated from one
  # and two unrolled layers: it must equal XLA's count of all three layers unrolled...
  unrolled = plan._compile_train_step(
      plan.for_accelerator(_small(*mesh, "model.scan_layers=false"), None), jax.devices())
  assert result["xla_flops_per_step"] == pytest.approx(8 * plan._cost_flops(unrolled), rel=1e-4)
  # ...and, without remat, land near the 6N + attention formula.
  assert result["xla_flops_per_step"] == pytest.approx(result["flops_per_step"], rel=0.15)
  memory = result["memory_per_device"]
  assert memory["total"] >= memory["arguments"] > 0
  # Sharded 2-way over fsdp and 2-way over tensor, each device holds at least a quarter of
  # the float32 parameters and Adam's two moments.
  assert memory["arguments"] >= 3 * 4 * result["params"] / 4
  hw = result["hardware"]
  assert hw["fits"] and "h100" in result["fits_on"]
  assert hw["tokens_per_sec"] == pytest.approx(
      0.5 * 8 * hardware.by_name("h100").peak_flops / result["flops_per_token"])
  assert hw["step_seconds"] == pytest.approx(tokens / hw["tokens_per_sec"])


def test_per_device_memory_falls_as_fsdp_grows():
  replicated, sharded = (
      plan.plan(_small(f"mesh.data={8 // fsdp}", f"mesh.fsdp={fsdp}"), 8, xla_flops=False)
      ["memory_per_device"] for fsdp in (1, 8))
  assert replicated["arguments"] > 4 * sharded["arguments"]
  assert replicated["total"] > sharded["total"]


def test_cli_json_and_table(capsys):
  assert cli.main(["plan", "--config.model.d_model=64", "--config.model.num_layers=1",
                   "--config.train.batch_size=8", "--skip_xla_flops", "--devices", "4",
                   "--hardware", "tpu-v5e", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["devices"] == 4 and result["hardware"]["name"] == "tpu-v5e"
  assert result["xla_flops_per_step"] is None
  table = plan.format_table(result, "tiny")
  for row in ("params_non_embedding", "memory/device: temporaries", "fits tpu-v5e",
              "tokens/s at 40% MFU"):
    assert row in table


def test_cli_makes_more_devices_in_a_fresh_process(capfd):
  with pytest.raises(SystemExit) as exit_info:  # this process has 8; 16 needs a new one
    cli.main(["plan", "--config.model.d_model=64", "--config.model.num_layers=1",
              "--config.train.batch_size=16", "--devices", "16", "--skip_xla_flops", "--json"])
  assert exit_info.value.code == 0
  result = json.loads(capfd.readouterr().out)
  assert result["devices"] == 16 and result["mesh"]["fsdp"] == 16


@pytest.mark.parametrize("args, words", [
    (["--hardware", "h1000"], ["h1000", "h100, h200, a100-40gb"]),
    (["--config.mesh.fsdp=3"], ["3", "8 devices"]),
    (["--mfu", "40"], ["--mfu=40"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, words, capsys):
  assert cli.main(["plan", "--devices", "8", *args]) == 2
  captured = capsys.readouterr()
  [line] = captured.err.strip().splitlines()
  assert line.startswith("llm-jax: error:") and all(w in line for w in words), line
  assert captured.out == ""


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("TPU v5 lite", "tpu-v5e"), ("TPU v5", "tpu-v5p"), ("TPU v6 lite", "tpu-v6e"),
    ("TPU v4", "tpu-v4"), ("NVIDIA H200", "h200")])
def test_device_kinds_map_to_the_hardware_table(kind, name):
  assert hardware.by_device_kind(kind).name == name


def test_unknown_device_kind_has_no_peak():
  assert hardware.by_device_kind("Mystery Accelerator 9000") is None
  with pytest.raises(UserError, match="tpu-v6e"):
    hardware.by_name("tpu-v7")


def test_mfu_peak_comes_from_the_hardware_table():
  class TpuV5e:  # what jax.devices() returns on a v5e slice, as far as peak_flops looks
    platform, device_kind = "tpu", "TPU v5 lite"
  peak, note = hardware.peak_flops([TpuV5e()] * 4)
  assert peak == 4 * hardware.by_name("tpu-v5e").peak_flops
  assert "TPU v5 lite" in note

