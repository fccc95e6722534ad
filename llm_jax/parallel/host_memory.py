"""glibc malloc settings for CPU runs: keep freed host memory for reuse instead of unmapping it.

XLA:CPU allocates a step's temporaries afresh on every step. With glibc's defaults, large
blocks are mmap'ed and handed back to the kernel when freed, so every step page-faults its
temporaries in again: on the 2-core benchmark machine that was a fifth of the default
config's train step, and a third of the process time was spent in the kernel. With these
settings malloc serves every block from one heap (one arena, no mmap) that it never trims,
so a step reuses the pages of the step before. glibc reads them only when a process starts,
so the `llm-jax` command re-executes itself once with them set (`reexec_with_tuned_malloc`).

They apply where JAX runs on the CPU: a CPU-only JAX install (no CUDA, ROCm or TPU plugin)
or JAX_PLATFORMS=cpu. Any MALLOC_* setting of your own is left alone, and
LLM_JAX_HOST_MALLOC=default turns this off.
"""

import importlib.util
import os
import platform
import sys

TUNED_MALLOC = {
    "MALLOC_ARENA_MAX": "1",  # one heap: blocks freed by one thread serve the next step's
    "MALLOC_MMAP_MAX_": "0",  # never mmap: large blocks come from the heap too
    "MALLOC_TRIM_THRESHOLD_": str(2**62),  # never give the heap's top back to the kernel
    "MALLOC_TOP_PAD_": str(2**30),  # grow the heap in large steps (address space, not RAM)
}
SWITCH = "LLM_JAX_HOST_MALLOC"  # 'default' turns tuning off; 'tuned' marks a tuned process
# JAX's GPU plugins install into the `jax_plugins` namespace; TPUs need `libtpu`.
_ACCELERATOR_PACKAGES = ("jax_plugins", "libtpu")


def _runs_on_cpu(environ) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PACKAGES)


def tuned_environment(environ) -> dict[str, str] | None:
  """`environ` plus TUNED_MALLOC, or None where the settings do not apply or are in place.

  None on systems other than Linux with glibc, where JAX will use an accelerator, when the
  user set LLM_JAX_HOST_MALLOC or any of the MALLOC_* variables, or in a tuned process.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  if SWITCH in environ or any(name in environ for name in TUNED_MALLOC):
    return None
  if not _runs_on_cpu(environ):
    return None
  return {**environ, **TUNED_MALLOC, SWITCH: "tuned"}


def reexec_with_tuned_malloc() -> None:
  """Replaces this process by the same command with TUNED_MALLOC set, where it applies.

  Call first thing in a program's entry point, before JAX is imported: the process keeps its
  id, arguments, standard streams and signal dispositions, and nothing is lost but the time
  to start Python again (a fraction of a second).
  """
  environment = tuned_environment(os.environ)
  if environment is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)
