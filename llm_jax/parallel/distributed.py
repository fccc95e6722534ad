"""Multi-host start-up: joins this process to the others through `jax.distributed`.

Every process of a multi-host run executes the same `llm-jax train` command; `initialize`
must run before anything else touches JAX, and then `jax.devices()` lists the devices of all
processes, so the mesh, the jitted steps and Orbax checkpoints span them all. Process 0 writes
logs and metrics (`is_primary`, `log`), and each process reads its own share of the data
(the pipeline splits by `jax.process_index()`).

Where the processes learn about each other (the `distributed` config section):
  * explicit: `coordinator_address` (HOST:PORT of process 0), `num_processes` and
    `process_id` all set -- any machine, including several processes on one CPU host;
  * SLURM: inside `srun`, JAX reads the job's node list, task count and rank;
  * Cloud TPU VM: JAX asks the TPU metadata server for the slice's workers;
  * none of these: a single process, nothing to initialise.
"""

import glob
import os
import pathlib
import socket
import sys
import time

import jax

from llm_jax.errors import UserError

_SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                         "SLURM_LOCALID")
# TPU chips on a TPU VM's PCI bus: Google's vendor id (which Google's virtual NICs share) and
# the chips' device ids (v3, v4, v5p, v5e, v6e, 7x and one unnamed generation).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def is_primary() -> bool:
  """Whether this process writes logs, metrics and files that exist once per run."""
  return jax.process_index() == 0


def log(message: str) -> None:
  """A line on standard error, from process 0 only."""
  if is_primary():
    print(message, file=sys.stderr, flush=True)


def detect_cluster(environ=os.environ, pci_devices="/sys/bus/pci/devices") -> str | None:
  """'slurm' inside an srun step, 'tpu' on a Cloud TPU VM, else None (one process)."""
  if all(name in environ for name in _SLURM_STEP_VARIABLES):
    # A one-task step (e.g. an interactive srun shell) is a single process with all its GPUs.
    return "slurm" if environ["SLURM_NTASKS"] != "1" else None
  for device in glob.glob(f"{pci_devices}/*"):
    vendor, device_id = (pathlib.Path(device, name) for name in ("vendor", "device"))
    if (vendor.is_file() and device_id.is_file()
        and vendor.read_text().strip() == _GOOGLE_PCI_VENDOR
        and device_id.read_text().strip() in _TPU_PCI_DEVICES):
      return "tpu"
  return None


def _slurm_devices(environ=os.environ) -> dict:
  """All of the node's GPUs for a node's only task; JAX's default is GPU SLURM_LOCALID."""
  tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", "")
  gpus = environ.get("SLURM_GPUS_ON_NODE", "")
  if gpus.isdigit() and all(t.split("(")[0] == "1" for t in tasks_per_node.split(",")):
    return {"local_device_ids": list(range(int(gpus)))}
  return {}


def _explicit_arguments(distributed_config) -> dict | None:
  """The explicitly configured coordinator, count and id; None when none is set."""
  d = distributed_config
  given = {"coordinator_address": d.coordinator_address != "",
           "num_processes": d.num_processes != 0, "process_id": d.process_id != -1}
  if not any(given.values()):
    return None
  if not all(given.values()):
    missing = ", ".join(f"distributed.{k}" for k, v in given.items() if not v)
    raise UserError("A multi-process run outside SLURM or a TPU VM needs all of "
                    "distributed.coordinator_address, num_processes and process_id; set "
                    f"{missing}.")
  host, _, port = d.coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"distributed.coordinator_address={d.coordinator_address!r} must be "
                    "HOST:PORT of process 0, e.g. 10.0.0.2:12355.")
  if d.num_processes < 1:
    raise UserError(f"distributed.num_processes={d.num_processes} must be at least 1.")
  if not 0 <= d.process_id < d.num_processes:
    raise UserError(f"distributed.process_id={d.process_id} is outside 0..{d.num_processes - 1} "
                    f"for distributed.num_processes={d.num_processes}; give each process its "
                    "own id in that range.")
  return {"coordinator_address": d.coordinator_address, "num_processes": d.num_processes,
          "process_id": d.process_id}


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once `address` accepts TCP connections; UserError after `timeout` seconds.

  JAX's runtime aborts the whole process when it cannot reach the coordinator, so the
  address is tried here first, where a failure can still be one clear sentence.
  """
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(f"Could not reach the coordinator at {address} within {timeout:g} s "
                        f"({e.strerror or e}); start process 0 first and check that its host "
                        "and port are reachable from here.") from None
      time.sleep(0.5)


def _check_port_free(address: str) -> None:
  port = int(address.rpartition(":")[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is ok
    try:
      s.bind(("", port))
    except OSError:
      raise UserError(f"Port {port} of distributed.coordinator_address={address!r} is already "
                      "in use on process 0's host; choose another port.") from None


def initialize(distributed_config) -> None:
  """Joins the run's other processes, if there are any; call before any other JAX use.

  Raises UserError for inconsistent settings, a coordinator port already taken, or a
  coordinator that does not answer within `distributed.initialization_timeout` seconds.
  """
  d = distributed_config
  if d.initialization_timeout < 1:
    raise UserError(f"distributed.initialization_timeout={d.initialization_timeout} must be at "
                    "least 1 second.")
  explicit = _explicit_arguments(d)
  cluster = detect_cluster()
  if explicit is None and cluster is None:
    return
  if (explicit is not None and explicit["num_processes"] == 1) or jax.distributed.is_initialized():
    return
  if explicit is not None:
    address, rank, count = (explicit[k] for k in ("coordinator_address", "process_id",
                                                   "num_processes"))
    print(f"Process {rank} of {count}: joining the coordinator at {address} (waiting up to "
          f"{d.initialization_timeout} s)", file=sys.stderr, flush=True)
    if rank == 0:
      _check_port_free(address)
    else:
      _wait_for_coordinator(address, d.initialization_timeout)
  # Cross-process collectives between CPU devices go through Gloo over TCP (accelerators use
  # their own: NCCL on GPU, ICI/DCN on TPU); set it rather than rely on JAX's default.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit is not None:
    arguments = explicit
  else:
    arguments = _slurm_devices() if cluster == "slurm" else {}
  jax.distributed.initialize(**arguments, initialization_timeout=d.initialization_timeout)
  print(f"Process {jax.process_index()} of {jax.process_count()} joined"
        f"{f' through {cluster}' if explicit is None else ''}: {jax.local_device_count()} of "
        f"{jax.device_count()} devices are local", file=sys.stderr, flush=True)
