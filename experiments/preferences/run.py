"""Reproduces experiments/preferences: a reward model and DPO, from the SFT demonstration's model,
on pairs whose better answer is known: the docstring sentence of the function asked about
(chosen) against an answer the SFT model itself sampled (rejected), as in RLHF data, where
the model's own answers are compared.

    python experiments/preferences/run.py [--runs runs/sft_demo]   # after experiments/sft/run.py

Training uses the SFT demonstration's training questions; every number below is on its
held-out questions (modules never trained on). Writes experiments/preferences/results.json
and metrics.png.
"""

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
# The SFT demonstration's helpers: its commands, data reading and answer scoring.
_spec = importlib.util.spec_from_file_location("sft_demo", ROOT / "experiments/sft/run.py")
sft_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sft_demo)
answer_scores, llm_jax = sft_demo.answer_scores, sft_demo.llm_jax
question_and_answer, read_jsonl = sft_demo.question_and_answer, sft_demo.read_jsonl


def write_pairs(sft: pathlib.Path, records: list[dict], path: pathlib.Path, seed: int) -> None:
  """One pair per question: the docstring sentence chosen, the SFT model's sample rejected
  (a sample that happens to equal the sentence makes an identical pair, which the loader
  skips and counts)."""
  qa = [question_and_answer(r) for r in records]
  prompts = path.with_suffix(".prompts.jsonl")
  prompts.write_text("".join(json.dumps(q) + "\n" for q, _ in qa))
  out = llm_jax("generate", "--workdir", str(sft), "--chat", "--prompt_file", str(prompts),
                "--jsonl", "--temperature", "1", "--max_new_tokens", "48", "--seed", str(seed),
                "--batch_size", "64")
  samples = [json.loads(line)["text"].strip() or "." for line in out.splitlines()]
  path.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": sample}) + "\n"
                          for (q, a), sample in zip(qa, samples)))


def pair_margins(workdir: pathlib.Path, pairs: pathlib.Path) -> np.ndarray:
  """Score of chosen − score of rejected for every pair that fits, where a score is a reward
  model's reward, or a policy's summed log-probability of the answer."""
  import jax
  from llm_jax.parallel import sharding
  from llm_jax.data import preferences
  from llm_jax.objectives.pairs import sequence_log_probs
  from llm_jax.objectives.reward_model import response_rewards
  from llm_jax.inference.run import load_run
  run = load_run(workdir)
  source = preferences.open_all_preferences(str(pairs))
  context = run.model.config.context_length

  @jax.jit
  def scores(params, batch):
    if run.model.config.reward_head:
      return tuple(response_rewards(run.model, params, batch[f"{s}_inputs"],
                                    batch[f"{s}_weights"]) for s in ("chosen", "rejected"))
    return sequence_log_probs(run.model, params, batch)

  margins = []
  with sharding.activate(run.mesh):
    for batch in preferences.evaluation_pair_batches(source.train, run.chat_format, context, 64,
                                                     len(source.train)):
      arrays = {k: v for k, v in batch.items() if k != "pair_index"}
      chosen, rejected = (np.asarray(x) for x in scores(run.params, arrays))
      margins += list((chosen - rejected)[batch["valid"] > 0])
  return np.asarray(margins)


def summary(margins: np.ndarray) -> dict:
  return {"pairs": len(margins), "accuracy": float((margins > 0).mean()),
          "mean_margin": float(margins.mean())}


def plot(runs: dict[str, pathlib.Path], out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for name, workdir in runs.items():
    rows = read_jsonl(workdir / "metrics.jsonl")
    for ax, metric in zip(axes, ("loss", "accuracy", "margin")):
      ax.plot([r["step"] for r in rows if metric in r], [r[metric] for r in rows if metric in r],
              label=f"{name}, training")
      val = [(r["step"], r[f"val_{metric}"]) for r in rows if f"val_{metric}" in r]
      ax.plot(*zip(*val), "o--", label=f"{name}, validation")
      ax.set_title(metric)
      ax.set_xlabel("step")
  axes[0].legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(out, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/sft_demo", help="the SFT demonstration's runs")
  runs = ROOT / parser.parse_args().runs
  sft, data = runs / "sft", runs / "data"
  if not (sft / "checkpoints").exists():
    subprocess.run([sys.executable, str(ROOT / "experiments/sft/run.py"), "--runs",
                    str(runs.relative_to(ROOT))], check=True)
  train_pairs, held_pairs = runs / "pairs_train.jsonl", runs / "pairs_held_out.jsonl"
  held_records = read_jsonl(runs / "held_out_scored.jsonl")
  if not held_pairs.exists():
    write_pairs(sft, read_jsonl(data / "train.jsonl"), train_pairs, seed=0)
    write_pairs(sft, held_records, held_pairs, seed=1)

  rm, dpo = runs / "reward", runs / "dpo"
  common = [f"--config.train.init_from={sft}", f"--config.data.source=preferences:{train_pairs}"]
  llm_jax("train", "--config", "configs/posttrain.py:reward", *common, "--workdir", str(rm))
  llm_jax("train", "--config", "configs/posttrain.py:dpo", *common, "--workdir", str(dpo))

  asked = held_records[::len(held_records) // 64][:64]
  sft_margins, dpo_margins = pair_margins(sft, held_pairs), pair_margins(dpo, held_pairs)
  beta = json.loads((dpo / "config.json").read_text())["objective"]["dpo_beta"]
  results = {
      # Does the reward model score the docstring above the model's own sample?
      "reward_model": summary(pair_margins(rm, held_pairs)),
      # Log-probability margins of chosen over rejected, and greedy answers' word F1.
      "sft_policy": {**summary(sft_margins),
                     **answer_scores(sft, asked, runs / "held_out_prompts.jsonl")},
      "dpo_policy": {**summary(dpo_margins),
                     **answer_scores(dpo, asked, runs / "held_out_prompts.jsonl")},
      # DPO's implicit reward margin, β × (the change of that margin from the reference):
      # its accuracy is the share of held-out pairs DPO moved the right way.
      "dpo_implicit_reward": summary(beta * (dpo_margins - sft_margins)),
  }
  (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  plot({"reward model": rm, "DPO": dpo}, HERE / "metrics.png")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
