"""Time and peak memory of `llm-jax hf import` and `hf export` for a Llama-3.2-1B-shaped model.

    python experiments/hf/roundtrip_1b.py [--dir /tmp/hf1b] [--dtype bfloat16]

Makes a randomly initialised LlamaForCausalLM with Llama 3.2 1B's config (no download; a
small byte-level BPE stands in for its tokenizer, the embedding keeps 128,256 rows), saves it
with save_pretrained, then runs both commands under /usr/bin/time -v and prints wall time
and peak resident memory beside the size of the weights.
"""

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys

LLAMA_32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=0,
    eos_token_id=1, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})


def _make_model(directory: pathlib.Path, dtype: str) -> None:
  import sysconfig

  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  config = transformers.LlamaConfig(**LLAMA_32_1B)
  model = transformers.LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
  model.save_pretrained(directory)
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  bpe.train_from_iterator((p.read_text() for p in sorted(stdlib.glob("*.py"))[:50]),
                          trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"]))
  transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>",
                                       eos_token="</s>").save_pretrained(directory)


def _timed(command: list[str]) -> dict:
  result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
  if result.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr)[1]
  seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
  return {"wall_s": round(seconds, 1), "peak_rss_gib": round(rss / 2**20, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/hf1b", help="scratch directory (rewritten)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  args = parser.parse_args()
  root = pathlib.Path(args.dir)
  shutil.rmtree(root, ignore_errors=True)
  _make_model(root / "hf", args.dtype)
  weights = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
  llm_jax = str(pathlib.Path(sys.executable).parent / "llm-jax")
  result = {"weights_gib": round(weights / 2**30, 2), "dtype": args.dtype,
            "import": _timed([llm_jax, "hf", "import", str(root / "hf"), "--workdir",
                              str(root / "run")]),
            "export": _timed([llm_jax, "hf", "export", "--workdir", str(root / "run"), "--out",
                              str(root / "out")])}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
