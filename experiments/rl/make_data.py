"""Builds the number problems of experiments/rl: SFT conversations, RL prompts, held-out ones.

    python experiments/rl/make_data.py [--out runs/rl_demo/data] [--kinds 2>2,3>3]
        [--sft 1200] [--rl 1600] [--held_out 400] [--force]

A kind is the digits of the first number, the operation and the digits of the second:
`2>2` asks "Which is larger, 47 or 38?" (answer "47"), `2+1` "What is 47+8?" ("55"), `3-3`
"What is 623-597?" (the larger number first, so no answer is negative). Answers are the bare
number. The kinds take turns, so each is equally common in every split; `--kinds` defaults to
the demonstration's comparisons (run.py; the README says why not sums).

Writes, disjoint by problem (no (a, op, b) in two files):
  OUT/sft/train.jsonl     {"messages": [user question, assistant answer]}: fine-tuning
  OUT/prompts/train.jsonl {"prompt": question, "answer": "85"}: RL (GRPO) prompts
  OUT/held_out.jsonl      the same form: evaluation before and after RL, never trained on
Offline and deterministic: one seed gives byte-identical files. A kind has a limited number of
distinct problems (900 for `2+1`): asking for more of one than exist never finishes.
"""

import argparse
import json
import pathlib
import random
import sys

KINDS = "2>2,3>3"  # digits of the first number, the operation, digits of the second


def parse_kinds(text: str) -> list[tuple[int, str, int]]:
  """'2+1,2-2' -> [(2, '+', 1), (2, '-', 2)]."""
  return [(int(k[0]), k[1], int(k[2:])) for k in text.split(",")]


def problem(rng: random.Random, digits_a: int, op: str, digits_b: int) -> tuple[int, str, int]:
  a = rng.randint(10 ** (digits_a - 1), 10 ** digits_a - 1)
  b = rng.randint(10 ** (digits_b - 1), 10 ** digits_b - 1)
  if op == ">" and a == b:
    return problem(rng, digits_a, op, digits_b)
  return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def question(a: int, op: str, b: int) -> str:
  return f"Which is larger, {a} or {b}?" if op == ">" else f"What is {a}{op}{b}?"


def answer(a: int, op: str, b: int) -> str:
  return str({"+": a + b, "-": a - b, ">": max(a, b)}[op])


def draw(rng: random.Random, kinds, count: int, taken: set) -> list[tuple[int, str, int]]:
  """`count` new problems, each kind in turn, none already in `taken`."""
  drawn = []
  while len(drawn) < count:
    p = problem(rng, *kinds[len(drawn) % len(kinds)])
    if p not in taken:
      taken.add(p)
      drawn.append(p)
  return drawn


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/rl_demo/data", type=pathlib.Path)
  parser.add_argument("--seed", default=0, type=int)
  parser.add_argument("--held_out", default=400, type=int, help="held-out problems")
  parser.add_argument("--sft", default=1200, type=int, help="SFT conversations")
  parser.add_argument("--rl", default=1600, type=int, help="RL prompts")
  parser.add_argument("--kinds", default=KINDS, help="kinds of problem, e.g. 2+2,3-3")
  parser.add_argument("--force", action="store_true", help="overwrite existing files")
  args = parser.parse_args()

  paths = {"held_out": args.out / "held_out.jsonl", "sft": args.out / "sft" / "train.jsonl",
           "rl": args.out / "prompts" / "train.jsonl"}
  existing = [str(p) for p in paths.values() if p.exists()]
  if existing and not args.force:
    sys.exit(f"Refusing to overwrite {', '.join(existing)}; pass --force to replace.")

  rng, taken = random.Random(args.seed), set()
  # Held out first, so its problems do not depend on how many SFT or RL problems are asked for.
  kinds = parse_kinds(args.kinds)
  held_out, sft, rl = (draw(rng, kinds, n, taken) for n in (args.held_out, args.sft, args.rl))
  write_jsonl(paths["held_out"], [{"prompt": question(*p), "answer": answer(*p)} for p in held_out])
  write_jsonl(paths["rl"], [{"prompt": question(*p), "answer": answer(*p)} for p in rl])
  write_jsonl(paths["sft"], [{"messages": [{"role": "user", "content": question(*p)},
                                           {"role": "assistant", "content": answer(*p)}]}
                             for p in sft])
  print(f"{len(held_out)} held-out problems, {len(sft)} SFT conversations and {len(rl)} RL "
        f"prompts in {args.out}")


if __name__ == "__main__":
  main()
