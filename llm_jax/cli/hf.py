"""`llm-jax hf import|export`: Hugging Face Llama-family checkpoints in and out."""

import sys

from llm_jax.cli import common


def _import(args, overrides) -> None:
  from llm_jax import hf
  common.no_overrides(overrides)
  result = hf.import_model(args.source, args.workdir, **common.given(args, "context_length"))
  print(f"Imported {args.source} as {args.workdir}: {result['params'] / 1e6:.1f}M "
        f"{result['param_dtype']} parameters, context {result['context_length']}, "
        f"{result['tokenizer_size']}-token tokenizer", file=sys.stderr)


def _export(args, overrides) -> None:
  from llm_jax import hf
  common.no_overrides(overrides)
  hf.export_model(args.workdir, args.out, **common.given(args, "step", "dtype"))


def add_commands(commands) -> None:
  group = commands.add_parser("hf", help="import or export Hugging Face Llama checkpoints")
  hf_commands = group.add_subparsers(dest="hf_command", required=True)
  to_run = hf_commands.add_parser(
      "import", help="a local HF Llama/Mistral directory as a run directory",
      description="Import a local Hugging Face LlamaForCausalLM or MistralForCausalLM "
      "directory (config.json, safetensors weights, tokenizer) as a run directory that every "
      "command accepts; train from it with --config.train.init_from=WORKDIR.")
  to_run.add_argument("source", help="the HF model directory")
  to_run.add_argument("--workdir", required=True, help="the run directory to create")
  to_run.add_argument("--context_length", type=int,
                      help="the run's context (default: the model's, at most 8192)")
  to_run.set_defaults(handler=_import)
  to_hf = hf_commands.add_parser(
      "export", help="a run's checkpoint as an HF Llama directory",
      description="Write a run's newest readable checkpoint (or --step) as a Hugging Face "
      "Llama directory: config.json, safetensors shards of at most 5 GB with an index, and "
      "tokenizer files that AutoTokenizer loads.")
  common.add_workdir_argument(to_hf)
  to_hf.add_argument("--out", required=True, help="a new (or empty) directory to write")
  to_hf.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
  to_hf.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the run's "
                     "parameter dtype)")
  to_hf.set_defaults(handler=_export)
