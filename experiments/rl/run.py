"""Reproduces experiments/rl: GRPO with an exact-answer reward on number problems, from an SFT
start that is right some of the time.

    python experiments/rl/run.py [--runs runs/rl_demo]     # about 20 minutes on 2 cores

Every step is the command a user would type (`llm-jax train` with configs/posttrain.py:sft,
then :grpo), run in turn; finished steps are reused when the script runs again (training
resumes or reports, the data is kept). Held-out accuracy is that of greedy answers
(`evaluate.py`). Writes experiments/rl/results.json and metrics.png.
"""

import argparse
import json
import pathlib
import subprocess
import sys

import evaluate  # experiments/rl/evaluate.py: run as a script, its directory is on sys.path

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KINDS = "2>2,3>3"  # which is larger, of two 2-digit or two 3-digit numbers
CONTEXT = 64  # a problem and its answer are about 30 tokens
SFT = ["--config.train.steps=1500", "--config.train.learning_rate=2e-3",
       "--config.train.eval_every=500"]
GRPO = ["--config.train.steps=1000", "--config.train.learning_rate=2e-4",
        "--config.train.eval_every=200", "--config.train.log_every=1",
        "--config.rl.max_completion_tokens=8"]
REWARD = f"{HERE / 'rewards.py'}:exact_answer"


def llm_jax(*args: str) -> None:
  print("+ llm-jax " + " ".join(args), file=sys.stderr, flush=True)
  subprocess.run([evaluate.llm_jax(), *args], cwd=ROOT, check=True)


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def windows(values: list[float], size: int) -> list[float]:
  return [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]


def plot(rows: list[dict], out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [r["step"] for r in rows if "reward_mean" in r]
  figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
  rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
  left.plot(steps, rewards, alpha=0.3, label="sampled completions, each step")
  left.plot([s + 25 for s in steps[::50]], windows(rewards, 50), "o-", label="mean of 50 steps")
  val = [(r["step"], r["val_reward"]) for r in rows if "val_reward" in r]
  left.plot(*zip(*val), "s-", label="greedy, validation prompts")
  left.set_xlabel("step")
  left.set_ylabel("reward (exact answer)")
  left.legend(fontsize=7)
  right.plot(steps, [r["kl"] for r in rows if "reward_mean" in r])
  right.set_xlabel("step")
  right.set_ylabel("KL to the SFT model (k3, per token)")
  figure.tight_layout()
  figure.savefig(out, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/rl_demo", help="where data and runs go")
  runs = ROOT / parser.parse_args().runs
  data, base, sft, grpo = runs / "data", runs / "base", runs / "sft", runs / "grpo"
  if not (data / "held_out.jsonl").exists():
    subprocess.run([sys.executable, str(HERE / "make_data.py"), "--out", str(data), "--kinds",
                    KINDS], check=True)
  held_out = data / "held_out.jsonl"

  llm_jax("train", "--workdir", str(base))  # the default pretrained model
  llm_jax("train", "--config", "configs/posttrain.py:sft", f"--config.train.init_from={base}",
          f"--config.data.source=chat:{data / 'sft' / 'train.jsonl'}",
          f"--config.model.context_length={CONTEXT}", *SFT, "--workdir", str(sft))
  before = evaluate.accuracy(evaluate.evaluate(str(sft), str(held_out)))
  llm_jax("train", "--config", "configs/posttrain.py:grpo", f"--config.train.init_from={sft}",
          f"--config.data.source=prompts:{data / 'prompts' / 'train.jsonl'}",
          f"--config.rl.reward={REWARD}", *GRPO, "--workdir", str(grpo))
  after = evaluate.accuracy(evaluate.evaluate(str(grpo), str(held_out)))

  rows = [r for r in read_jsonl(grpo / "metrics.jsonl") if "reward_mean" in r]
  cost = {name: sum(r[name] for r in rows[1:]) / (len(rows) - 1)  # step 1 compiles
          for name in ("generation_seconds", "reward_seconds", "update_seconds",
                       "rollout_tokens_per_sec", "completion_length")}
  results = {"held_out_before": before, "held_out_after": after,
             "sampled_reward_per_200_steps": windows([r["reward_mean"] for r in rows], 200),
             "kl_per_200_steps": windows([r["kl"] for r in rows], 200),
             "mean_step_cost": cost}
  (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  plot(read_jsonl(grpo / "metrics.jsonl"), HERE / "metrics.png")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
