"""Builds a small supervised fine-tuning set: questions about Python standard-library functions.

    python experiments/sft/make_data.py --out /tmp/sft_data [--force]

Reads the standard library's .py sources with `ast` (nothing is imported, so the output depends
only on the files) and, for each public module-level function and each public method of a public
class with a docstring, writes one conversation: a question such as "What does `json.dumps` do?"
answered with the first sentence of the docstring. Offline and deterministic: the same Python
installation gives byte-identical files.

The split into DIR/train.jsonl and DIR/held_out.jsonl is by top-level module (all of `json.*` on
one side), not by function: functions of one module share vocabulary and often whole phrases, so a
random split would hold out near-copies of training answers. Held-out questions are about modules
never trained on, which measures answering in the format, not recall.

Most lines are `{"messages": [{"role": ..., "content": ...}, ...]}`; every 10th training line is
ShareGPT's `{"conversations": [{"from": ..., "value": ...}, ...]}` and about 1 in 20 training lines
starts with a system message, so a loader is exercised on both forms with and without a system
turn. Held-out lines are all plain two-turn `messages`, the form an evaluation prompts with.
"""

import argparse
import ast
import json
import re
import statistics
import sys
import sysconfig
import zlib
from pathlib import Path

SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
PHRASINGS = (
    "What does `{}` do?",
    "Explain `{}` in one sentence.",
    "What is `{}` for?",
    "In one sentence, what does `{}` do?",
    "Briefly, what is the purpose of `{}`?",
)
SYSTEM_PROMPT = "You answer questions about the Python standard library in one sentence."
MIN_ANSWER_CHARS, MAX_ANSWER_CHARS = 20, 200
HELD_OUT_BUCKETS = 10  # one bucket of ten: about 10% of top-level modules are held out
SHAREGPT_EVERY = 10
SYSTEM_ONE_IN = 20
# A first line starting like a call ("dumps(obj) -> str", "S.find(sub[, start]) -> int",
# imaplib's "(typ, [data]) = <instance>.capability()") is a signature, not what the function does.
SIGNATURE_LINE = re.compile(r"^(\(.*\) = )?[\w.<>]+\(")
# A full stop and a space end the first sentence, except after "e.g.", "i.e." and "etc.", where
# cutting would leave "Returns the machine type, e.g." as the answer.
SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!etc)\. ")


def crc(text):
  # zlib.crc32, not hash(): str hashes are salted per process, which would change the files.
  return zlib.crc32(text.encode())


def module_name(path, stdlib):
  """The dotted import path of a source file, or None for files that are skipped."""
  parts = list(path.relative_to(stdlib).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  # Skipped trees at any depth (ctypes/test), private modules, and directories that cannot be
  # imported (config-3.11-x86_64-linux-gnu).
  if any(p in SKIPPED_DIRS or p.startswith("_") or not p.isidentifier() for p in parts):
    return None
  return ".".join(parts)


def first_sentence(docstring):
  """The docstring's first sentence, or None if it is a signature or out of the length range."""
  paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
  lines = [line.strip() for line in paragraph.splitlines()]
  if not lines or SIGNATURE_LINE.match(lines[0]):
    return None
  text = " ".join(lines)
  end = SENTENCE_END.search(text)
  sentence = text[:end.start() + 1] if end else text
  if sentence.endswith(":"):  # "Return ... as follows:" introduces a list the answer would lose
    return None
  return sentence if MIN_ANSWER_CHARS <= len(sentence) <= MAX_ANSWER_CHARS else None


def public_definitions(body, kinds):
  # Only the statements directly in the body: definitions under `if`/`try` are platform variants.
  return [node for node in body if isinstance(node, kinds) and not node.name.startswith("_")]


def documented_functions(tree, module):
  """(qualified name, docstring) of public functions and public methods of public classes."""
  for node in public_definitions(tree.body, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    if isinstance(node, ast.ClassDef):
      for method in public_definitions(node.body, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if method.name.startswith(("do_", "help_")):  # cmd.Cmd commands: help opening with usage
          continue
        yield f"{module}.{node.name}.{method.name}", ast.get_docstring(method)
    else:
      yield f"{module}.{node.name}", ast.get_docstring(node)


def collect_answers(stdlib):
  """{qualified name: answer}; of a name defined twice the first wins (a property's getter)."""
  answers = {}
  for path in sorted(stdlib.rglob("*.py")):
    module = module_name(path, stdlib)
    if module is None:
      continue
    try:
      tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # a few sources are deliberately invalid or not UTF-8
      continue
    for name, docstring in documented_functions(tree, module):
      answer = first_sentence(docstring) if docstring else None
      if answer and name not in answers:
        answers[name] = answer
  return answers


def conversation(question, answer, sharegpt, system):
  turns = [("system", SYSTEM_PROMPT)] if system else []
  turns += [("user", question), ("assistant", answer)]
  if sharegpt:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": speaker[role], "value": text} for role, text in turns]}
  return {"messages": [{"role": role, "content": text} for role, text in turns]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, type=Path,
                      help="directory for train.jsonl and held_out.jsonl")
  parser.add_argument("--force", action="store_true", help="overwrite existing output files")
  args = parser.parse_args()

  outputs = {"train": args.out / "train.jsonl", "held_out": args.out / "held_out.jsonl"}
  existing = [str(p) for p in outputs.values() if p.exists()]
  if existing and not args.force:
    print(f"Refusing to overwrite {', '.join(existing)}; pass --force to replace.", file=sys.stderr)
    sys.exit(2)

  answers = collect_answers(Path(sysconfig.get_paths()["stdlib"]))
  pairs = {"train": [], "held_out": []}
  modules = {"train": set(), "held_out": set()}
  seen = set()
  for name, answer in sorted(answers.items()):
    top = name.split(".")[0]
    side = "held_out" if crc(top) % HELD_OUT_BUCKETS == 0 else "train"
    question = PHRASINGS[crc(name) % len(PHRASINGS)].format(name)
    if (question, answer) not in seen:  # names are unique, so this only guards the invariant
      seen.add((question, answer))
      pairs[side].append((question, answer))
      modules[side].add(top)

  args.out.mkdir(parents=True, exist_ok=True)
  for side, path in outputs.items():
    with path.open("w") as f:
      for i, (question, answer) in enumerate(pairs[side]):  # sorted by qualified name
        training = side == "train"
        sharegpt = training and i % SHAREGPT_EVERY == SHAREGPT_EVERY - 1
        # By hash, not by line index, so system turns fall on both forms.
        system = training and crc("system:" + question) % SYSTEM_ONE_IN == 0
        line = conversation(question, answer, sharegpt, system)
        f.write(json.dumps(line, ensure_ascii=False) + "\n")

  answer_lengths = [len(answer) for side in pairs.values() for _, answer in side]
  print(f"{len(pairs['train'])} train and {len(pairs['held_out'])} held-out conversations "
        f"from {len(modules['train'])} and {len(modules['held_out'])} top-level modules; "
        f"mean answer {statistics.mean(answer_lengths or [0]):.0f} characters")


if __name__ == "__main__":
  main()
