"""Reproduces experiments/sft: supervised fine-tuning of the default pretrained model on
questions about standard-library functions, answered with their docstrings' first sentence.

    python experiments/sft/run.py [--runs runs/sft_demo]     # about 15 minutes on 2 cores

Every step is the command a user would type (`llm-jax train`, `eval --chat`, `generate --chat`,
`chat`), run in turn; finished steps are reused when the script runs again (training resumes
or reports, the data is kept). Writes experiments/sft/results.json, transcripts.md and
losses.png.
"""

import argparse
import collections
import functools
import json
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
PRETRAINING_CONTEXT, SFT_CONTEXT = 128, 256
ASKED = 64  # questions answered greedily and compared with the reference, per split
TRANSCRIPT_QUESTIONS = 4


def llm_jax(*args: str, stdin: str | None = None) -> str:
  print("+ llm-jax " + " ".join(args), file=sys.stderr, flush=True)
  done = subprocess.run(["llm-jax", *args], input=stdin, stdout=subprocess.PIPE, text=True,
                        cwd=ROOT, check=True)
  return done.stdout


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def question_and_answer(record: dict) -> tuple[str, str]:
  turns = [(m["role"], m["content"]) for m in record.get("messages", [])] or [
      ({"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), t["value"])
      for t in record["conversations"]]
  return ([c for r, c in turns if r == "user"][0], [c for r, c in turns if r == "assistant"][0])


def word_f1(answer: str, reference: str) -> float:
  """F1 of the words two texts share (as SQuAD scores answers), punctuation ignored."""
  a, b = (re.findall(r"\w+", t.lower()) for t in (answer, reference))
  common = sum((collections.Counter(a) & collections.Counter(b)).values())
  return 0.0 if not common else 2 * common / (len(a) + len(b))


def answer_scores(workdir: pathlib.Path, records: list[dict], prompts: pathlib.Path) -> dict:
  """Greedy answers against the reference sentences: exact matches and mean word F1."""
  pairs = [question_and_answer(r) for r in records]
  prompts.write_text("".join(json.dumps(q) + "\n" for q, _ in pairs))
  out = llm_jax("generate", "--workdir", str(workdir), "--chat", "--prompt_file", str(prompts),
                "--jsonl", "--batch_size", "64")
  answers = [json.loads(line)["text"] for line in out.splitlines()]
  return {"exact": sum(a.strip() == r.strip() for a, (_, r) in zip(answers, pairs)) / len(pairs),
          "word_f1": sum(word_f1(a, r) for a, (_, r) in zip(answers, pairs)) / len(pairs)}


@functools.cache
def chat_format(run: pathlib.Path):
  from llm_jax.data import chat_template, tokenizer
  return chat_template.chat_format(tokenizer.saved_tokenizer(run))


def fits(record: dict, run: pathlib.Path, context: int) -> bool:
  from llm_jax.data import conversations
  return chat_format(run).encode(conversations.from_record(record), context + 1) is not None


def packing(data: pathlib.Path, base: pathlib.Path) -> dict:
  """Non-padding share of packed rows at the pretraining context and at fine-tuning's."""
  from llm_jax.data import conversations, pipeline
  source = conversations.open_chat(f"chat:{data / 'train.jsonl'}", 0.02)
  chat = chat_format(base)
  shares = {}
  for context in (PRETRAINING_CONTEXT, SFT_CONTEXT):
    counts, _ = pipeline.chat_statistics(source.train, chat, context, truncate=False)
    shares[context] = {**counts, "non_padding": counts["tokens"] / (counts["rows"] * (context + 1))}
  return shares


def plot(metrics: pathlib.Path, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_jsonl(metrics)
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
  figure, axes = plt.subplots(figsize=(6, 3.5))
  axes.plot(*zip(*train), label="training loss (assistant tokens)")
  axes.plot(*zip(*val), "o-", label="validation loss (assistant tokens)")
  axes.set_xlabel("step")
  axes.set_ylabel("nats per token")
  axes.legend()
  figure.tight_layout()
  figure.savefig(out, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/sft_demo", help="where data and runs go")
  runs = ROOT / parser.parse_args().runs
  data, base, sft = runs / "data", runs / "base", runs / "sft"
  if not (data / "train.jsonl").exists():
    subprocess.run([sys.executable, str(HERE / "make_data.py"), "--out", str(data)], check=True)
  held_out = data / "held_out.jsonl"

  llm_jax("train", "--workdir", str(base))  # the default pretrained model
  # Fine-tuning packs rows of twice the pretraining context: conversations (a median of 80
  # tokens) fill them better, and positions restart in each, so few pass position 128. Both
  # models are scored on the held-out conversations that fit the base model's context.
  scored = runs / "held_out_scored.jsonl"
  scored.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(held_out)
                            if fits(r, base, PRETRAINING_CONTEXT)))
  before = json.loads(llm_jax("eval", "--workdir", str(base), "--chat", str(scored), "--json"))
  llm_jax("train", "--config", "configs/posttrain.py:sft", f"--config.train.init_from={base}",
          f"--config.data.source=chat:{data / 'train.jsonl'}",
          f"--config.model.context_length={SFT_CONTEXT}", "--workdir", str(sft))
  after = json.loads(llm_jax("eval", "--workdir", str(sft), "--chat", str(scored), "--json"))

  train_records = [r for r in read_jsonl(data / "train.jsonl")
                   if fits(r, base, PRETRAINING_CONTEXT)]
  held_records = read_jsonl(scored)
  asked = {"train": train_records[::len(train_records) // ASKED][:ASKED],
           "held_out": held_records[::len(held_records) // ASKED][:ASKED]}
  answers = {f"{name} {split}": answer_scores(run, records, runs / f"{split}_prompts.jsonl")
             for name, run in (("base", base), ("sft", sft))
             for split, records in asked.items()}

  chosen = held_records[::len(held_records) // TRANSCRIPT_QUESTIONS][:TRANSCRIPT_QUESTIONS]
  questions = [question_and_answer(r) for r in chosen]
  replies = llm_jax("chat", "--workdir", str(sft),
                    stdin="/reset\n".join(q + "\n" for q, _ in questions)).splitlines()
  transcript = ["# `llm-jax chat` (piped, greedy, /reset between questions) on held-out questions\n"]
  for (question, reference), answer in zip(questions, replies):
    transcript += [f"> **user:** {question}\n>\n> **assistant:** {answer}\n>\n"
                   f"> *(docstring: {reference})*\n"]
  (HERE / "transcripts.md").write_text("\n".join(transcript))

  results = {"held_out_before": before, "held_out_after": after, "answers": answers,
             "packing": packing(data, base)}
  (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  plot(sft / "metrics.jsonl", HERE / "losses.png")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
