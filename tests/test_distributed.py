"""Multi-process training through jax.distributed, and the start-up's bad-input messages."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from llm_jax import config as config_lib
from llm_jax.parallel import distributed
from llm_jax.errors import UserError
from llm_jax.train.loop import train

from conftest import TINY_OVERRIDES

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLM_JAX = pathlib.Path(sys.executable).parent / "llm-jax"


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_of_four_devices_log_the_losses_of_one_process_of_eight(
    tmp_path, text_corpus, tokenizer):
  tokenizer_path = tmp_path / "tokenizer.model"
  tokenizer.save(tokenizer_path)
  overrides = [*TINY_OVERRIDES, "train.steps=10", "train.sample_tokens=4",
               f"data.source=files:{text_corpus}/*.py", f"data.tokenizer={tokenizer_path}"]
  train(config_lib.load_config(None, overrides), tmp_path / "one")  # this process: 8 devices

  logs = tmp_path / "logs"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(
      [ROOT / "launch" / "local.sh", "--processes", "2", "--devices_per_process", "4",
       "--logdir", logs, "--", *(f"--config.{o}" for o in overrides),
       "--workdir", tmp_path / "two"],
      env={**env, "LLM_JAX": str(LLM_JAX)}, check=True, timeout=300, capture_output=True)

  for rank in (0, 1):
    assert f"Process {rank} of 2 joined: 4 of 8 devices are local" in (
        logs / f"process_{rank}.log").read_text()
  one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
  assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10]  # process 0 wrote once
  for a, b in zip(one, two):
    for key in ("loss", "grad_norm", "val_loss"):
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def _distributed(*overrides):
  return config_lib.load_config(None, [f"distributed.{o}" for o in overrides]).distributed


@pytest.mark.parametrize("overrides, words", [
    (["coordinator_address=localhost:1234", "num_processes=2", "process_id=2"],
     ["distributed.process_id=2", "0..1"]),
    (["coordinator_address=localhost:1234", "num_processes=2"], ["distributed.process_id"]),
    (["coordinator_address=localhost", "num_processes=2", "process_id=0"], ["HOST:PORT"]),
    (["coordinator_address=localhost:1234", "num_processes=-2", "process_id=0"],
     ["distributed.num_processes=-2"]),
    (["initialization_timeout=0"], ["distributed.initialization_timeout=0"]),
])
def test_bad_settings_fail_with_one_sentence_naming_the_key(overrides, words):
  with pytest.raises(UserError) as info:
    distributed.initialize(_distributed(*overrides))
  assert all(w in str(info.value) for w in words), str(info.value)


def test_unreachable_coordinator_fails_clearly_after_a_bounded_wait(tmp_path):
  result = subprocess.run(
      [LLM_JAX, "train", "--workdir", tmp_path, "--config.distributed.process_id=1",
       "--config.distributed.coordinator_address=localhost:1",
       "--config.distributed.num_processes=2", "--config.distributed.initialization_timeout=2"],
      capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("llm-jax: error: Could not reach the coordinator at localhost:1")
  assert not (tmp_path / "config.json").exists()


def test_cluster_detection_reads_slurm_step_variables():
  step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
          "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
  assert distributed.detect_cluster(step) == "slurm"
  batch_script_only = {k: v for k, v in step.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.detect_cluster(batch_script_only) != "slurm"
  assert distributed.detect_cluster({**step, "SLURM_NTASKS": "1"}) != "slurm"


def test_one_slurm_task_per_node_drives_all_its_gpus():
  per_node = {"SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_GPUS_ON_NODE": "8"}
  assert distributed._slurm_devices(per_node) == {"local_device_ids": list(range(8))}
  per_gpu = {"SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_GPUS_ON_NODE": "8"}
  assert distributed._slurm_devices(per_gpu) == {}  # JAX's default: GPU SLURM_LOCALID


def test_tpu_detection_needs_a_tpu_chip_not_just_a_google_pci_device(tmp_path):
  def pci_device(name, vendor, device):
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")
    (tmp_path / name / "device").write_text(device + "\n")
  pci_device("0000:00:04.0", "0x1ae0", "0x0042")  # a Google virtual NIC on any GCE VM
  pci_device("0000:00:05.0", "0x10de", "0x2330")  # an NVIDIA H100
  assert distributed.detect_cluster({}, tmp_path) is None
  pci_device("0000:00:06.0", "0x1ae0", "0x0063")  # a TPU v5e chip
  assert distributed.detect_cluster({}, tmp_path) == "tpu"
