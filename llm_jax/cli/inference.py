"""`llm-jax generate|chat|predict|eval|reward`: a trained run put to use."""

import itertools
import json
import sys

from llm_jax import paths
from llm_jax.cli import common
from llm_jax.errors import UserError


def _load_run(args, overrides):
  from llm_jax.inference.run import load_run
  from llm_jax.model import flops
  run = load_run(args.workdir, overrides)
  print(f"Loaded {args.workdir} at step {run.step}: "
        f"{flops.param_counts(run.model.config)['params'] / 1e6:.2f}M parameters, mesh "
        f"{dict(run.mesh.shape)}", file=sys.stderr)
  return run


def _generate(args, overrides) -> None:
  from llm_jax.data.prompts import read_prompt_file
  prompts = [args.prompt] if args.prompt_file is None else read_prompt_file(args.prompt_file)
  run = _load_run(args, overrides)
  outputs = run.generate(prompts, **common.given(
      args, "max_new_tokens", "temperature", "top_k", "top_p", "beams", "length_penalty",
      "num_samples", "seed", "batch_size", "chat"))
  texts = []
  for index, (prompt, samples) in enumerate(zip(prompts, outputs)):
    for sample, text in enumerate(samples):
      full = prompt + text if args.echo else text
      texts.append(json.dumps({"prompt_index": index, "sample": sample, "prompt": prompt,
                               "text": full}) if args.jsonl else full)
  sys.stdout.write(("\n" if args.jsonl else "\n\n").join(texts) + "\n")


_CHAT_HELP = "/reset forgets the conversation, /system TEXT sets the system message, /exit ends"


def _chat(args, overrides) -> None:
  """A conversation on the terminal, or one user message per line of piped input."""
  run = _load_run(args, overrides)
  run.chat_format  # refuses a tokenizer without chat tokens before anything is typed
  interactive = sys.stdin.isatty()
  context = run.model.config.context_length
  room = args.max_new_tokens or max(1, context // 4)  # kept free for each answer
  options = common.given(args, "max_new_tokens", "temperature", "top_k", "top_p")
  system = [{"role": "system", "content": args.system}] if args.system else []
  history = []
  if interactive:
    print(f"Chatting with {args.workdir} ({_CHAT_HELP}).", file=sys.stderr)
  for turn in itertools.count():
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() == "/exit":
      break
    text = line.rstrip("\n")
    if text.startswith("/"):
      command, _, argument = text.partition(" ")
      if command == "/reset":
        history = []
        _notice("(the conversation starts over)")
      elif command == "/system":
        system = [{"role": "system", "content": argument}] if argument.strip() else []
        _notice(f"(system message {'set' if system else 'cleared'})")
      else:
        _notice(f"(unknown command {command}; {_CHAT_HELP})")
      continue
    if not text.strip():
      continue
    history.append({"role": "user", "content": text})
    dropped = 0
    while len(run.chat_format.prompt(system + history)) + room > context and len(history) > 1:
      history = history[2:]  # the oldest exchange: a user turn and its answer
      dropped += 1
    if dropped:
      _notice(f"(the context is full: dropped the oldest {dropped} exchange"
              f"{'s' * (dropped > 1)})")
    try:
      run.chat_prompt(system + history)
    except UserError as e:  # this message alone leaves no room for an answer
      history.pop()
      _notice(f"({e})")
      continue
    answer = []
    for piece in run.stream_chat(system + history, seed=args.seed + turn, **options):
      answer.append(piece)
      sys.stdout.write(piece)
      sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if "".join(answer).strip():
      history.append({"role": "assistant", "content": "".join(answer)})
    else:  # an empty turn cannot be part of a conversation; forget the question too
      history.pop()
      _notice("(the model ended its turn without an answer)")


def _reward(args, overrides) -> None:
  run = _load_run(args, overrides)
  score = run.reward(args.prompt, args.response)
  print(json.dumps({"prompt": args.prompt, "response": args.response, "reward": score})
        if args.json else f"{score:.6g}")


def _notice(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def _predict(args, overrides) -> None:
  plot = paths.check_new_file(args.plot, "--plot", replace=True) if args.plot else None
  run = _load_run(args, overrides)
  distribution = run.next_token_distribution(args.prompt, **common.given(args, "top"))
  if args.json:
    print(json.dumps({"prompt": args.prompt, "top": [vars(t) for t in distribution.top],
                      "rest": distribution.rest, "rest_count": distribution.rest_count}))
  else:
    print(f"{'rank':>4}  {'id':>6}  {'token':<24}  probability")
    for rank, token in enumerate(distribution.top, 1):
      print(f"{rank:>4}  {token.id:>6}  {repr(token.piece):<24}  {token.probability:.6f}")
    print(f"{'':>4}  {'':>6}  {f'rest ({distribution.rest_count} tokens)':<24}  "
          f"{distribution.rest:.6f}")
  if plot:
    plot.parent.mkdir(parents=True, exist_ok=True)
    _plot_distribution(distribution, args.prompt, plot)
    print(f"Wrote {args.plot}", file=sys.stderr)


def _eval(args, overrides) -> None:
  run = _load_run(args, overrides)
  result = run.evaluate(args.files, **common.given(args, "max_tokens", "batch_size", "chat"))
  if args.json:
    print(json.dumps(result))
    return
  what = args.chat or args.files or "the validation split"
  if "conversations" in result:
    skipped = ", ".join(f"{n} {reason}" for reason, n in result.get("skipped", {}).items())
    print(f"{what}: {result['conversations']} conversations ({result['too_long']} longer than "
          f"the context left out{'; skipped lines: ' + skipped if skipped else ''}), "
          f"{result['tokens']:,} assistant tokens")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}")
    return
  print(f"{what}: {result['documents']} documents, {result['tokens']:,} tokens, "
        f"{result['bytes']:,} bytes")
  print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
        f"bits per byte {result['bits_per_byte']:.4f}")


def add_commands(commands) -> None:
  generate = commands.add_parser(
      "generate", help="continue prompts with a trained run (text on stdout)",
      description="Continue prompts with the newest checkpoint of a run. Only the generated "
      "text goes to stdout (several texts are separated by a blank line, or use --jsonl); "
      "progress goes to stderr. A prompt is refused, not truncated, when it leaves no room "
      "for --max_new_tokens in the context. --config.mesh.KEY=VALUE picks the mesh.")
  common.add_workdir_argument(generate)
  prompt = generate.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="text to continue")
  prompt.add_argument("--prompt_file", help="one prompt per line (.jsonl: a JSON string or "
                      '{"prompt": ...} per line)')
  generate.add_argument("--max_new_tokens", type=int,
                        help="new tokens at most (default: the rest of the context, <= 256)")
  generate.add_argument("--temperature", type=float,
                        help="0 is greedy (default); higher samples more freely")
  generate.add_argument("--top_k", type=int, help="sample only among the k most likely tokens")
  generate.add_argument("--top_p", type=float,
                        help="sample only within the smallest set of mass >= p (nucleus)")
  generate.add_argument("--beams", type=int, help="beam search with this many beams")
  generate.add_argument("--length_penalty", type=float,
                        help="beams rank by log-prob / length**this (0: total log-prob)")
  generate.add_argument("--num_samples", type=int,
                        help="texts per prompt (samples, or the best beams)")
  generate.add_argument("--seed", type=int, help="seed of the sampling")
  generate.add_argument("--batch_size", type=int, help="rows decoded at once")
  generate.add_argument("--echo", action="store_true", help="print each prompt before its text")
  generate.add_argument("--jsonl", action="store_true",
                        help="one JSON object per text: prompt_index, sample, prompt, text")
  generate.add_argument("--chat", action="store_true", default=None,
                        help="ask each prompt as a user's turn; print the assistant's answers")
  generate.set_defaults(handler=_generate)

  chat = commands.add_parser(
      "chat", help="talk with a fine-tuned run (multi-turn, streamed)",
      description="A conversation with the newest checkpoint of a run trained on "
      f"conversations. Each line typed is a user's turn; the answer streams as it is "
      f"generated and ends at the end of its turn. {_CHAT_HELP}. When the context is full the "
      "oldest exchanges are dropped, with a notice. With piped input, each line is one user "
      "message and each answer goes to stdout followed by a newline; notices go to stderr.")
  common.add_workdir_argument(chat)
  chat.add_argument("--system", help="system message that opens the conversation")
  chat.add_argument("--max_new_tokens", type=int,
                    help="tokens per answer at most (default: the rest of the context, <= 256, "
                    "keeping a quarter of it free)")
  chat.add_argument("--temperature", type=float, help="0 is greedy (default)")
  chat.add_argument("--top_k", type=int, help="sample only among the k most likely tokens")
  chat.add_argument("--top_p", type=float, help="sample within the smallest set of mass >= p")
  chat.add_argument("--seed", type=int, default=0, help="seed of the sampling")
  chat.set_defaults(handler=_chat)

  predict = commands.add_parser(
      "predict", help="the next-token probability distribution after a prompt",
      description="Print the most likely next tokens after a prompt with their "
      "probabilities, and the probability mass of all the others.")
  common.add_workdir_argument(predict)
  predict.add_argument("--prompt", required=True, help="text whose next token to predict")
  predict.add_argument("--top", type=int, help="tokens to list")
  predict.add_argument("--plot", help="also save a bar chart as this PNG")
  predict.add_argument("--json", action="store_true", help="print one JSON object")
  predict.set_defaults(handler=_predict)

  evaluate = commands.add_parser(
      "eval", help="loss, perplexity and bits per byte of a trained run",
      description="Score the run's validation split (or --files) with the newest checkpoint: "
      "mean next-token loss, perplexity and bits per byte, with the tokens scored.")
  common.add_workdir_argument(evaluate)
  scored = evaluate.add_mutually_exclusive_group()
  scored.add_argument("--files",
                      help="glob of files to score instead (quote it; .jsonl: one document "
                      "per line)")
  scored.add_argument("--chat", help="glob of .jsonl conversations whose assistant tokens to "
                      "score instead (quote it)")
  evaluate.add_argument("--max_tokens", type=int,
                        help="stop after the document that reaches this many tokens (0: all)")
  evaluate.add_argument("--batch_size", type=int,
                        help="rows scored at once (default: the run's train.batch_size)")
  evaluate.add_argument("--json", action="store_true", help="print one JSON object")
  evaluate.set_defaults(handler=_eval)

  reward = commands.add_parser(
      "reward", help="a reward model's score of a response to a prompt",
      description="Score a response to a prompt with a reward model (a run trained with "
      "configs/posttrain.py:reward): the prompt is asked as a user's turn and the response "
      "is the assistant's answer. Higher is better; only differences between scores of "
      "answers to one prompt are meaningful.")
  common.add_workdir_argument(reward)
  reward.add_argument("--prompt", required=True, help="the user's message")
  reward.add_argument("--response", required=True, help="the assistant's answer to score")
  reward.add_argument("--json", action="store_true", help="print one JSON object")
  reward.set_defaults(handler=_reward)


def _plot_distribution(distribution, prompt: str, path) -> None:
  """Saves a bar chart of `distribution` (the top tokens and the rest) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")  # files only; no display needed
  import matplotlib.pyplot as plt

  labels = [repr(t.piece) for t in distribution.top] + [
      f"rest ({distribution.rest_count} tokens)"]
  values = [t.probability for t in distribution.top] + [distribution.rest]
  figure, axes = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.2))
  bars = axes.barh(range(len(labels)), values, color=["C0"] * len(distribution.top) + ["0.6"])
  axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
  axes.set_yticks(range(len(labels)), labels, fontsize=8)
  axes.invert_yaxis()
  axes.set_xlim(0, min(1.0, max(values) * 1.15 + 0.02))
  axes.set_xlabel("probability of the next token")
  shown = prompt if len(prompt) <= 60 else "…" + prompt[-59:]
  axes.set_title(f"after {shown!r}", fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
