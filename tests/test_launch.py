"""Launch scripts: what --dry-run would run for a sample input, and clear refusals.

No test here runs gcloud or srun: dry runs only print, and everything else runs with a PATH
that holds neither (or only a fake gcloud that records its arguments), so a broken check
could not start a real slice.
"""

import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
TRAIN_ARGS = ["--", "--config", "configs/llama.py:llama2-7b", "--workdir", "/shared/runs/7b"]
TPU_ARGS = ["--project", "my-project", "--zone", "us-central2-b", "--name", "llama-7b"]
SLURM_ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16",
             "SLURM_GPUS_ON_NODE": "8", "PATH": "/usr/bin:/bin"}


def _run(script, *args, env=None):
  return subprocess.run(["/bin/bash", LAUNCH / script, *args], capture_output=True, text=True,
                        env=env, timeout=30)


def _lines_with(text, *words):
  return [line for line in text.splitlines() if all(w in line for w in words)]


def test_tpu_dry_run_creates_copies_installs_trains_on_all_workers_and_deletes():
  result = _run("tpu_vm.sh", *TPU_ARGS, "--accelerator_type", "v4-32", "--delete", "--dry-run",
                *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert _lines_with(out, "gcloud compute tpus tpu-vm create llama-7b", "--zone=us-central2-b",
                     "--project=my-project", "--accelerator-type=v4-32")
  assert _lines_with(out, "gcloud compute tpus tpu-vm scp", "--worker=all")
  assert _lines_with(out, "tpu-vm ssh llama-7b", "--worker=all", "pip", "jax\\[tpu\\]")
  assert _lines_with(out, "tpu-vm ssh llama-7b", "--worker=all", "llm-jax\\ train\\ --config\\ "
                     "configs/llama.py:llama2-7b\\ --workdir\\ /shared/runs/7b")
  # v4-32 is 16 chips on 4 hosts: one log per worker comes back.
  assert len(_lines_with(out, "llm-jax-train.log", "tpu_logs/llama-7b/worker_")) == 4
  assert out.strip().splitlines()[-1].startswith("gcloud compute tpus tpu-vm delete llama-7b")


@pytest.mark.parametrize("accelerator, workers", [("v5p-8", 1), ("v5litepod-16", 4),
                                                   ("v6e-8", 1), ("v6e-64", 16)])
def test_tpu_worker_count_follows_the_accelerator_type(accelerator, workers):
  result = _run("tpu_vm.sh", *TPU_ARGS, "--accelerator_type", accelerator, "--dry-run",
                *TRAIN_ARGS)
  assert len(_lines_with(result.stdout, "worker_")) == workers
  assert "delete" not in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--zone", "us-central2-b", "--name", "x", "--accelerator_type", "v4-8"], ["--project"]),
    (["--project", "p", "--zone", "central", "--name", "x", "--accelerator_type", "v4-8"],
     ["--zone='central'"]),
    ([*TPU_ARGS, "--accelerator_type", "v4-12"], ["v4-12", "multiples of 8"]),
    ([*TPU_ARGS, "--accelerator_type", "a100-8"], ["a100-8", "v5p-N"]),
    ([*TPU_ARGS, "--accelerator_type", "v4-8"], ["gcloud is not on PATH"]),
])
def test_tpu_bad_input_or_missing_gcloud_is_one_sentence(args, words, tmp_path):
  result = _run("tpu_vm.sh", *args, *TRAIN_ARGS, env={"PATH": str(tmp_path)})
  assert result.returncode == 2
  assert result.stdout == ""
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("launch/tpu_vm.sh: error:") and all(w in line for w in words), line


def test_slurm_dry_run_starts_one_process_per_gpu_with_the_throughput_flags():
  result = _run("slurm.sbatch", "--dry-run", *TRAIN_ARGS, env=SLURM_ENV)
  assert result.returncode == 0, result.stderr
  [srun] = _lines_with(result.stdout, "srun ")
  assert srun.split() == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                          "llm-jax", "train", *TRAIN_ARGS[1:]]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in result.stdout


def test_slurm_one_process_per_node_needs_one_task_per_node():
  env = {**SLURM_ENV, "SLURM_NTASKS": "2"}
  result = _run("slurm.sbatch", "--per", "node", "--dry-run", *TRAIN_ARGS, env=env)
  assert "--ntasks-per-node=1" in result.stdout
  result = _run("slurm.sbatch", "--per", "node", "--dry-run", *TRAIN_ARGS, env=SLURM_ENV)
  assert result.returncode == 2 and "--ntasks-per-node=1" in result.stderr


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_GPUS_ON_NODE"])
def test_slurm_without_its_variables_is_one_sentence(missing):
  env = {k: v for k, v in SLURM_ENV.items() if k != missing}
  result = _run("slurm.sbatch", *TRAIN_ARGS, env=env)
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith(f"launch/slurm.sbatch: error: {missing} is not set"), line


def test_local_dry_run_gives_each_process_its_rank_and_the_same_coordinator():
  result = _run("local.sh", "--processes", "3", "--devices_per_process", "2", "--port", "4321",
                "--dry-run", *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for rank, line in enumerate(lines):
    assert line.startswith("XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu "
                           "llm-jax train --config configs/llama.py:llama2-7b")
    assert line.endswith("--config.distributed.coordinator_address=localhost:4321 "
                         f"--config.distributed.num_processes=3 "
                         f"--config.distributed.process_id={rank}")


@pytest.mark.parametrize("args, words", [(["--processes", "0"], ["--processes='0'"]),
                                         (["--port", "99999"], ["--port='99999'"]),
                                         (["--nodes", "2"], ["--nodes"])])
def test_local_bad_input_is_one_sentence(args, words):
  result = _run("local.sh", *args, *TRAIN_ARGS)
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("launch/local.sh: error:") and all(w in line for w in words), line


@pytest.fixture
def fake_gcloud(tmp_path):
  """A PATH whose only gcloud records its arguments (and knows one slice, if told)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("tar", "gzip", "dirname", "mkdir"):
    (bin_dir / tool).symlink_to(subprocess.run(["/bin/bash", "-c", f"command -v {tool}"],
                                               capture_output=True, text=True).stdout.strip())
  gcloud = bin_dir / "gcloud"
  gcloud.write_text('#!/bin/bash\necho "$*" >> "$GCLOUD_CALLS"\n'
                    'if [[ "$*" == *"tpu-vm describe"* ]]; then\n'
                    '  [[ -n "$EXISTING_TYPE" ]] && echo "$EXISTING_TYPE" && exit 0\n'
                    '  exit 1\nfi\n')
  gcloud.chmod(0o755)
  calls = tmp_path / "gcloud_calls"
  return {"PATH": str(bin_dir), "GCLOUD_CALLS": str(calls), "TMPDIR": str(tmp_path)}, calls


def test_tpu_run_calls_gcloud_in_order_and_collects_each_workers_log(fake_gcloud, tmp_path):
  env, calls = fake_gcloud
  args = [*TPU_ARGS[:-1], "fake-slice-test", "--accelerator_type", "v5litepod-16",
          "--logdir", str(tmp_path / "logs"), "--delete", *TRAIN_ARGS]
  result = _run("tpu_vm.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  verbs = [" ".join(line.split()[2:4]) for line in calls.read_text().splitlines()]
  assert verbs == ["tpu-vm describe", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
                   *["tpu-vm scp"] * 4, "tpu-vm delete"]
  assert (tmp_path / "logs").is_dir() and (tmp_path / "llm-jax-fake-slice-test.tar.gz").is_file()


def test_tpu_existing_slice_of_another_type_is_refused(fake_gcloud):
  env, calls = fake_gcloud
  result = _run("tpu_vm.sh", *TPU_ARGS, "--accelerator_type", "v4-32", *TRAIN_ARGS,
                env={**env, "EXISTING_TYPE": "v4-8"})
  assert result.returncode == 2
  assert "already exists as v4-8, not v4-32" in result.stderr
  assert [line.split()[3] for line in calls.read_text().splitlines()] == ["describe"]
