"""Held-out accuracy of a run on the number problems of experiments/rl (greedy answers).

    python experiments/rl/evaluate.py --workdir runs/rl_demo/sft \
        [--problems runs/rl_demo/data/held_out.jsonl] [--answers FILE.jsonl] [--json]

Asks every problem as a user's turn with `llm-jax generate --chat --jsonl` (greedy, so the
number is the run's, not a sample's), scores each answer with rewards.exact_answer and prints
the accuracy overall and by kind (`2>2`, `3+3`, ...). The same command scores the SFT start
and the model after RL. `--answers` keeps each problem with its answer and score.
"""

import argparse
import collections
import json
import pathlib
import re
import shutil
import subprocess
import sys

import rewards  # experiments/rl/rewards.py: run as a script, its directory is on sys.path

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
MAX_NEW_TOKENS = 8  # an answer is at most 4 digits, then <|im_end|>; a few more show run-ons


def llm_jax() -> str:
  """The `llm-jax` beside this Python (the venv's), else the one on PATH."""
  beside = pathlib.Path(sys.executable).with_name("llm-jax")
  return str(beside) if beside.exists() else shutil.which("llm-jax") or "llm-jax"


def kind(prompt: str) -> str:
  """"2+1" for "What is 47+8?": the group a problem is reported under."""
  a, op, b = re.search(r"(\d+)\s*([+-]|or)\s*(\d+)", prompt).groups()
  return f"{len(a)}{'>' if op == 'or' else op}{len(b)}"


def evaluate(workdir: str, problems: str, batch_size: int = 64) -> list[dict]:
  """Each problem of `problems` (jsonl of prompt and answer) with its greedy answer and reward."""
  problems, workdir = pathlib.Path(problems).resolve(), pathlib.Path(workdir).resolve()
  records = [json.loads(line) for line in problems.read_text().splitlines()]
  out = subprocess.run(
      [llm_jax(), "generate", "--workdir", str(workdir), "--chat", "--prompt_file", str(problems),
       "--jsonl", "--batch_size", str(batch_size), "--max_new_tokens", str(MAX_NEW_TOKENS)],
      stdout=subprocess.PIPE, text=True, cwd=ROOT, check=True).stdout
  texts = {json.loads(line)["prompt_index"]: json.loads(line)["text"] for line in out.splitlines()}
  scored = []
  for i, record in enumerate(records):
    fields = {k: v for k, v in record.items() if k != "prompt"}  # as GRPO passes them
    reward = rewards.exact_answer(record["prompt"], texts[i], **fields)
    scored.append({**record, "completion": texts[i], "reward": reward})
  return scored


def accuracy(scored: list[dict]) -> dict:
  """Mean reward overall and by kind of problem."""
  by_kind = collections.defaultdict(list)
  for s in scored:
    by_kind[kind(s["prompt"])].append(s["reward"])
  return {"accuracy": sum(s["reward"] for s in scored) / len(scored), "problems": len(scored),
          **{k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="run directory of `llm-jax train`")
  parser.add_argument("--problems", default="runs/rl_demo/data/held_out.jsonl")
  parser.add_argument("--answers", help="write each problem, its answer and reward here (jsonl)")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")
  args = parser.parse_args()
  scored = evaluate(args.workdir, args.problems)
  if args.answers:
    pathlib.Path(args.answers).write_text("".join(json.dumps(s) + "\n" for s in scored))
  result = accuracy(scored)
  if args.json:
    print(json.dumps(result))
  else:
    print("\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                    for k, v in result.items()))


if __name__ == "__main__":
  main()
