"""The malloc settings of CPU runs and the re-exec that applies them."""

import os
import platform
import subprocess
import sys

import pytest

from llm_jax.parallel import host_memory

glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's")


@glibc_linux
def test_cpu_runs_get_the_settings_once():
  environment = host_memory.tuned_environment({"JAX_PLATFORMS": "cpu", "HOME": "/h"})
  assert environment == {"JAX_PLATFORMS": "cpu", "HOME": "/h", **host_memory.TUNED_MALLOC,
                         host_memory.SWITCH: "tuned"}
  assert host_memory.tuned_environment(environment) is None  # a tuned process stays as it is


@glibc_linux
@pytest.mark.parametrize("environ", [
    {"JAX_PLATFORMS": "cuda"},  # an accelerator run: host memory is not the bottleneck
    {"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"},  # the user's own malloc settings
    {"JAX_PLATFORMS": "cpu", host_memory.SWITCH: "default"},  # switched off
])
def test_settings_are_left_alone(environ):
  assert host_memory.tuned_environment(environ) is None


@glibc_linux
def test_reexec_keeps_the_process_and_sets_the_environment():
  script = ("import os; from llm_jax.parallel import host_memory; "
            "print(os.getpid(), os.environ.get('MALLOC_MMAP_MAX_'), flush=True); "
            "host_memory.reexec_with_tuned_malloc()")
  environment = {k: v for k, v in os.environ.items()
                 if k != host_memory.SWITCH and k not in host_memory.TUNED_MALLOC}
  environment["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True,
                          text=True, check=True, timeout=60)
  first, second = [line.split() for line in result.stdout.splitlines()]
  assert first[0] == second[0]  # the same process, re-executed
  assert (first[1], second[1]) == ("None", "0")  # then it stops: tuned once
