"""`llm-jax plan|sweep|scaling fit|bench`: sizing, timing and scaling studies of configs."""

import json
import os
import subprocess
import sys

from llm_jax import paths
from llm_jax.cli import common
from llm_jax.errors import UserError


def _use_fake_cpu_devices(count: int) -> bool:
  """Makes JAX start with `count` fake CPU devices; False if JAX already started with fewer.

  XLA reads the device count when JAX first initialises its backend, so this must run before
  anything imports and uses JAX; the CLI imports it lazily for that reason.
  """
  if "jax" in sys.modules:
    import jax
    return jax.default_backend() == "cpu" and jax.device_count() >= count
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  return True


def _plan(args, overrides) -> None:
  if not _use_fake_cpu_devices(args.devices):
    # JAX is already running here with other devices: plan in a fresh process.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    command = [sys.executable, "-m", "llm_jax.cli", *args.argv]
    raise SystemExit(subprocess.run(command, env=env, check=False).returncode)
  from llm_jax.tools import plan
  result = plan.plan(common.load_config(args, overrides), args.devices, args.hardware,
                     **common.given(args, "target_mfu"), xla_flops=not args.skip_xla_flops)
  print(json.dumps(result) if args.json else
        plan.format_table(result, args.config or "configs/base.py"))


def _sweep(args, overrides) -> None:
  import jax
  from llm_jax.tools import sweep as sweep_lib
  common.no_overrides(overrides)
  sweep_dir = paths.check_directory(
      args.sweep_dir or sweep_lib.default_sweep_dir(args.sweep_file), "--sweep_dir")
  sweep = sweep_lib.load_sweep(args.sweep_file)
  members = sweep_lib.resolve(sweep, sweep_dir, jax.device_count())
  chosen = sweep_lib.select(members, args.only)
  if args.print_commands:
    command = sweep_lib.tokenizer_command(sweep, sweep_dir)
    if command:
      print(command)
    for member in chosen:
      print(sweep_lib.train_command(member, sweep.base))
    return
  print(sweep_lib.describe(chosen))
  if args.dry_run:
    return
  rows = sweep_lib.run(sweep, members, sweep_dir, args.only)
  failed = [row["name"] for row in rows if row["status"] == "failed"]
  print(f"{sum(row['status'] == 'finished' for row in rows)}/{len(rows)} members finished; "
        f"results in {sweep_dir / 'sweep.jsonl'}", file=sys.stderr)
  if failed:
    raise UserError(f"{len(failed)} sweep members failed ({', '.join(failed)}); see "
                    f"{sweep_dir / 'sweep.jsonl'} for their errors.")


def _scaling_fit(args, overrides) -> None:
  from llm_jax.tools import scaling
  common.no_overrides(overrides)
  out = paths.check_directory(args.out, "--out")
  fits = scaling.fit_and_plot(args.sweep, out, overwrite=args.overwrite, **common.given(
      args, "draws", "seed", "loss_key", "params_key"))
  print(scaling.summary(fits))


def _bench(args, overrides) -> None:
  from llm_jax.tools import bench
  out = paths.check_new_file(args.out, "--out") if args.out else None
  result = bench.measure(common.load_config(args, overrides), **common.given(args, "steps"),
                         inference=not args.train_only)
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
  if args.json:
    print(json.dumps(result))
    return
  print(bench.summary(result))


def add_commands(commands) -> None:
  plan = commands.add_parser(
      "plan", help="compile the train step for N fake devices: size, memory, FLOPs, speed",
      description="Compile the real train step ahead of time for a mesh of N devices (fake "
      "CPU devices, no parameters materialised) and print parameters, FLOPs, per-device memory, "
      "fit and speed on a named accelerator.")
  common.add_config_argument(plan)
  plan.add_argument("--devices", type=int, required=True, help="devices of the target mesh")
  plan.add_argument("--hardware",
                    help="accelerator to check fit and speed against, e.g. h100, tpu-v5p")
  plan.add_argument("--mfu", dest="target_mfu", metavar="MFU", type=float,
                    help="model FLOPs utilisation assumed for step time and tokens/s")
  plan.add_argument("--skip_xla_flops", action="store_true",
                    help="skip the two small extra compiles that count XLA's FLOPs")
  plan.add_argument("--json", action="store_true", help="print one JSON object")
  plan.set_defaults(handler=_plan)

  sweep = commands.add_parser(
      "sweep", help="train every member of a sweep file, one after another (resumable)",
      description="Train the members of configs/sweeps/NAME.py in SWEEP_DIR/<member>; "
                  "finished members are skipped, interrupted ones resume.")
  sweep.add_argument("sweep_file", help="a sweep file defining get_sweep()")
  sweep.add_argument("--sweep_dir",
                     help="directory of the members' workdirs (default: runs/sweeps/NAME)")
  sweep.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="check every member and print their table; train nothing")
  sweep.add_argument("--only", nargs="+", default=[], metavar="NAME",
                     help="run only these members")
  sweep.add_argument("--print-commands", "--print_commands", dest="print_commands",
                     action="store_true",
                     help="print one `llm-jax train` command per member instead of training")
  sweep.set_defaults(handler=_sweep)

  scaling = commands.add_parser("scaling", help="fit scaling laws to a sweep's results")
  scaling_commands = scaling.add_subparsers(dest="scaling_command", required=True)
  fit = scaling_commands.add_parser(
      "fit", help="IsoFLOP and parametric fits with bootstrap intervals, and their plots",
      description="Fit Chinchilla approaches 2 and 3 to SWEEP_DIR/sweep.jsonl; write "
                  "scaling_fit.json, isoflop.png, optimal.png and parametric.png to --out.")
  fit.add_argument("sweep", help="a sweep directory or its sweep.jsonl")
  fit.add_argument("--out", required=True, help="directory for the fit JSON and plots")
  fit.add_argument("--draws", type=int, help="bootstrap resamples")
  fit.add_argument("--seed", type=int, help="seed of the bootstrap")
  fit.add_argument("--loss", dest="loss_key", metavar="LOSS",
                   help="row field fitted: val_loss or train_loss")
  fit.add_argument("--params", dest="params_key", metavar="PARAMS",
                   help="row field used as N: params or params_non_embedding")
  fit.add_argument("--overwrite", action="store_true", help="replace existing fit outputs")
  fit.set_defaults(handler=_scaling_fit)

  bench = commands.add_parser(
      "bench", help="time the train step, prefill and decode of a config",
      description="Time the real jitted train step (and prefill and decode) of a config on a "
                  "synthetic batch: compile time, median step time, tokens/s, FLOPs, MFU.")
  common.add_config_argument(bench)
  bench.add_argument("--steps", type=int,
                     help="timed calls after warm-up; the median is reported")
  bench.add_argument("--train_only", action="store_true",
                     help="skip the prefill and decode measurements")
  bench.add_argument("--out", help="also write the JSON to this new file")
  bench.add_argument("--json", action="store_true", help="print one JSON object")
  bench.set_defaults(handler=_bench)
