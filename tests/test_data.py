"""The input pipeline: sources, packing, determinism, per-host shards, resume, evaluation."""

import json
import re

import numpy as np
import pytest

from llm_jax import cli
from llm_jax.data import conversations, documents, pipeline, preferences, prompts, sources
from llm_jax.errors import UserError

from conftest import data_config


def _pieces(rows):
  """Token lists of every segment in packed rows (each row: tokens and segment ids)."""
  pieces = []
  for row in rows:
    tokens, segments = row["tokens"], row["tokens_segment_ids"]
    for s in np.unique(segments[segments > 0]):
      pieces.append(tokens[segments == s].tolist())
  return pieces


def _take(dataset, n):
  iterator = iter(dataset)
  return [next(iterator) for _ in range(n)]


def _documents_seen(batches, tokenizer):
  """Ids of the 'doc N' documents whose start (with its number) is in any of `batches`."""
  seen = set()
  for batch in batches:
    # A row's last token appears only as a target; put it back so starts are not cut short.
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    last = batch["segment_ids"][:, -1:] + (batch["weights"][:, -1:] == 0)
    for row, segments in zip(rows, np.concatenate([batch["segment_ids"], last], axis=1)):
      for s in np.unique(segments):
        piece = row[segments == s]
        match = re.match(r"doc (\d+) ", tokenizer.decode(piece[1:]))
        if piece[0] == tokenizer.bos_id and match:  # a row may still cut a start short
          seen.add(int(match.group(1)))
  return seen



def test_packing_loses_nothing_and_keeps_documents_apart(tokenizer):
  docs = ["alpha beta gamma " * n for n in range(1, 9)] + ["x = 1\n" * 40]
  rows = list(pipeline.packed_rows(docs, tokenizer, 16, seed=None, repeat=False))
  assert all(len(r["tokens"]) == 17 for r in rows[:-1])
  stream = [t for piece in _pieces(rows) for t in piece]
  expected = [t for d in docs for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
  # Rows drop nothing and repeat nothing: the pieces, in order, are every document.
  assert stream == expected
  batch = pipeline.to_model_inputs({k: np.stack([r[k] for r in rows[:-1]]) for k in rows[0]})
  seg = batch["segment_ids"]
  # A target is weighted only when it belongs to the same document as its input.
  crossing = np.concatenate([seg[:, 1:] != seg[:, :-1], np.zeros((len(seg), 1), bool)], axis=1)
  assert np.all(batch["weights"][crossing] == 0) and batch["weights"].sum() > 0
  starts = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  assert np.all(batch["positions"][starts] == 0)  # positions restart at every piece


def test_same_seed_same_batches_different_seed_different_order(tokenizer):
  docs = [f"document number {i} " * (i % 7 + 1) for i in range(50)]

  def first(seed):
    return [b["inputs"] for b in _take(
        pipeline.training_dataset([(docs, 1.0)], tokenizer, 16, 4, seed=seed), 3)]

  assert all(np.array_equal(a, b) for a, b in zip(first(1), first(1)))
  assert not all(np.array_equal(a, b) for a, b in zip(first(1), first(2)))


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_disjoint_shards_that_together_are_the_global_batch(tokenizer, hosts):
  docs = [f"doc {i} " + "word " * (i % 5) for i in range(64)]
  steps = 24  # each stream has 8 short documents: about ten epochs' worth
  single = _take(pipeline.training_dataset([(docs, 1.0)], tokenizer, 32, 8, seed=3), steps)
  local = [_take(pipeline.training_dataset([(docs, 1.0)], tokenizer, 32, 8, seed=3,
                                           process_index=p, process_count=hosts), steps)
           for p in range(hosts)]
  seen = [_documents_seen(batches, tokenizer) for batches in local]
  for a in range(hosts):
    for b in range(a + 1, hosts):
      assert not seen[a] & seen[b]
  assert set().union(*seen) == set(range(len(docs)))
  for step in range(steps):
    for key in single[step]:
      np.testing.assert_array_equal(
          np.concatenate([batches[step][key] for batches in local]), single[step][key])


def test_too_few_documents_for_the_process_count(tokenizer):
  docs = ["only one document here"]
  with pytest.raises(UserError, match="2 processes cannot read disjoint documents"):
    pipeline.training_dataset([(docs, 1.0)], tokenizer, 16, 8, seed=0, process_count=2)
  # One process is fine: a single long document feeds every row.
  batch = _take(pipeline.training_dataset([(docs * 1, 1.0)], tokenizer, 16, 8, seed=0), 1)[0]
  assert batch["inputs"].shape == (8, 16)


def test_iterator_state_resumes_exactly_wherever_it_was_saved(tokenizer):
  docs = [f"text {i} " * (i % 11 + 1) for i in range(40)]
  mixture = [(docs, 0.7), ([f"other {i} " * 9 for i in range(12)], 0.3)]
  ds = pipeline.training_dataset(mixture, tokenizer, 16, 4, seed=0)
  # Save points land both between documents and inside one being packed.
  for consumed in range(1, 12):
    it = iter(ds)
    for _ in range(consumed):
      next(it)
    saved = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(saved)
    for batch in expected:
      np.testing.assert_array_equal(batch["inputs"], next(resumed)["inputs"])


def test_mixture_weights_are_token_shares(tokenizer):
  a = [f"alpha {i} " * 6 for i in range(40)]
  b = [f"beta {i} " * 6 for i in range(40)]
  batches = _take(pipeline.training_dataset([(a, 0.75), (b, 0.25)], tokenizer, 16, 8, seed=0),
                  20)
  counts = {"alpha": 0, "beta": 0}
  for batch in batches:
    for row in batch["inputs"]:
      text = tokenizer.decode(row)
      counts["alpha" if "alpha" in text else "beta"] += 1
      assert not ("alpha" in text and "beta" in text)  # rows never mix sources
  assert counts["alpha"] / sum(counts.values()) == pytest.approx(0.75, abs=0.03)


def test_parse_mixture():
  assert sources.parse_mixture("builtin=3; files:a/*.md=1") == [
      ("builtin", 0.75), ("files:a/*.md", 0.25)]
  for bad in ("builtin", "builtin=0", "builtin=x", "=2", "builtin=nan"):
    with pytest.raises(UserError, match="SOURCE=WEIGHT"):
      sources.parse_mixture(bad)


def test_files_source_reads_text_and_jsonl_and_counts_what_it_skips(tmp_path):
  (tmp_path / "good.txt").write_text("hello world\n" * 10)
  (tmp_path / "good2.md").write_text("# title\nsome text\n")
  (tmp_path / "copy.md").write_text("# title\nsome text\n")
  (tmp_path / "empty.txt").write_text("   \n")
  (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02abc")
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  lines = [json.dumps({"body": "first record"}), "{not json", json.dumps({"title": "no body"}),
           "", json.dumps({"body": "  "}), json.dumps({"body": "second record \u00e9"})]
  (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
  source = sources.open_source(f"files:{tmp_path}/*", data_config(
      "text_key=body", "val_fraction=0.5"))
  texts = sorted(source.train[i] for i in range(len(source.train))) + sorted(
      source.validation[i] for i in range(len(source.validation)))
  assert sorted(texts) == sorted(["hello world\n" * 10, "# title\nsome text\n",
                                  "first record", "second record \u00e9"])
  assert source.skipped == {"unreadable": 0, "binary": 1, "undecodable": 1, "empty": 2,
                            "duplicate": 1, "not JSON": 1, "missing text key": 1}
  assert "1 binary" in source.summary() and "1 not JSON" in source.summary()


def test_builtin_split_is_fixed_and_disjoint():
  a = sources.open_source("builtin", data_config())
  b = sources.open_source("builtin", data_config())
  val = [a.validation[i] for i in range(len(a.validation))]
  assert val == [b.validation[i] for i in range(len(b.validation))] and val
  assert len(a.train) > 50 * len(a.validation) / 2
  assert not set(val) & {a.train[i] for i in range(len(a.train))}


def test_held_out_records_partition_the_split():
  docs = [str(i) for i in range(23)]
  held = documents.HeldOut(docs, 5, held=True)
  kept = documents.HeldOut(docs, 5, held=False)
  held_items = [held[i] for i in range(len(held))]
  kept_items = [kept[i] for i in range(len(kept))]
  assert held_items == ["0", "5", "10", "15", "20"]
  assert sorted(held_items + kept_items, key=int) == docs
  with pytest.raises(IndexError):
    kept[len(kept)]


@pytest.mark.parametrize("overrides, words", [
    (["source=files:/nonexistent/**/*.txt"], "matches no files"),
    (["source=web:http://x"], "not a known source"),
    (["source=files:/x/*.txt", "mixture=builtin=1"], "Both data.source"),
])
def test_bad_sources(overrides, words):
  with pytest.raises(UserError, match=words):
    sources.open_sources(data_config(*overrides))


def test_nothing_usable_says_what_was_skipped(tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_bytes(b"\x01\x00\x02")
  (tmp_path / "c.jsonl").write_text('{"txt": "wrong key"}\n')
  with pytest.raises(UserError, match=r"No usable text.*1 binary, 1 empty, 1 missing text key"
                                      r".*data.text_key='text'"):
    sources.open_source(f"files:{tmp_path}/*", data_config())


def test_single_document_cannot_be_split(tmp_path):
  (tmp_path / "only.txt").write_text("a lonely document")
  with pytest.raises(UserError, match="single usable document"):
    sources.open_source(f"files:{tmp_path}/*", data_config())


def test_evaluation_set_is_fixed_across_processes_and_batch_sizes(tokenizer):
  docs = [f"doc{i} " + "word " * (30 * (i + 1)) for i in range(6)]
  mixture = [(docs, 1.0)]
  single = pipeline.evaluation_batches(mixture, tokenizer, 16, batch_size=8, num_tokens=200)
  assert len(single) == 2  # ceil(200 / 16) = 13 rows, padded to 2 batches of 8
  assert single[1]["weights"][5:].sum() == 0 and single[1]["weights"][:5].all(axis=1).any()
  assert np.all(single[0]["inputs"][:6, 0] == tokenizer.bos_id)  # first rows of all documents
  halves = [pipeline.evaluation_batches(mixture, tokenizer, 16, 8, 200, process_index=p,
                                        process_count=2) for p in (0, 1)]
  for b in range(2):
    for key in single[b]:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][b][key], halves[1][b][key]]), single[b][key])
  small = pipeline.evaluation_batches(mixture, tokenizer, 16, batch_size=4, num_tokens=200)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in small])[:13],
                                np.concatenate([b["inputs"] for b in single])[:13])


def test_evaluation_reads_only_the_documents_it_needs(tokenizer):
  class Counting(list):
    reads = 0

    def __getitem__(self, index):
      Counting.reads += 1
      return super().__getitem__(index)

  docs = Counting(f"document {i} is short" for i in range(1000))
  pipeline.evaluation_batches([(docs, 1.0)], tokenizer, 16, 8, num_tokens=16 * 24)
  assert Counting.reads == 24


def test_data_bench_prints_throughput(text_corpus, tokenizer, tmp_path, capsys):
  path = tmp_path / "tok.model"
  tokenizer.save(path)
  code = cli.main(["data", "bench", "--batches", "5", "--json",
                   f"--config.data.source=files:{text_corpus}/*.py",
                   f"--config.data.tokenizer={path}", "--config.model.context_length=32"])
  result = json.loads(capsys.readouterr().out)
  assert code == 0
  assert result["tokens_per_sec"] > 0 and result["batch_tokens"] == 16 * 32
  assert "validation documents" in result["sources"][0]


def _all(source) -> list:
  return [source.train[i] for i in range(len(source.train))] + [
      source.validation[i] for i in range(len(source.validation))]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_utf8_byte_order_mark_is_read_past_in_every_kind_of_file(tmp_path, newline):
  """Files that begin with a UTF-8 byte-order mark give what the same files without it give:
  text, text lines, conversations, preference pairs and prompts, scanned and read alike."""
  user = {"role": "user", "content": "hi \u00e9"}
  lines = {
      "files": [{"text": f"record {i} \u00e9"} for i in range(4)],
      "chat": [{"messages": [user, {"role": "assistant", "content": f"answer {i}"}]}
               for i in range(4)],
      "preferences": [{"prompt": f"say {i}", "chosen": "yes", "rejected": "no"}
                      for i in range(4)],
      "prompts": [{"prompt": f"what is {i}?", "answer": str(i)} for i in range(4)]}
  opens = {"files": lambda spec: sources.open_source(spec, data_config("val_fraction=0.5")),
           "chat": lambda spec: conversations.open_chat(spec, 0.5),
           "preferences": lambda spec: preferences.open_preferences(spec, 0.5),
           "prompts": lambda spec: prompts.open_prompts(spec, 0.5)}
  for kind, records in lines.items():
    text = newline.join(json.dumps(r, ensure_ascii=False) for r in records) + newline
    for name, bom in (("plain", b""), ("marked", b"\xef\xbb\xbf")):
      (tmp_path / name / kind).mkdir(parents=True)
      (tmp_path / name / kind / "data.jsonl").write_bytes(bom + text.encode())
    plain, marked = (opens[kind](f"{kind}:{tmp_path}/{name}/{kind}/*.jsonl")
                     for name in ("plain", "marked"))
    assert sorted(map(json.dumps, _all(marked))) == sorted(map(json.dumps, _all(plain)))
    assert len(_all(marked)) == 4 and marked.skipped == plain.skipped
  (tmp_path / "docs").mkdir()
  for i in range(2):
    (tmp_path / "docs" / f"{i}.txt").write_bytes(b"\xef\xbb\xbfdocument %d\n" % i)
  assert sorted(_all(sources.open_source(f"files:{tmp_path}/docs/*", data_config()))) == [
      "document 0\n", "document 1\n"]
  (tmp_path / "prompts.txt").write_bytes(b"\xef\xbb\xbffirst\r\nsecond\r\n")
  assert prompts.read_prompt_file(tmp_path / "prompts.txt") == ["first", "second"]


def test_a_utf16_file_is_counted_undecodable_in_one_sentence(tmp_path):
  line = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}]})
  (tmp_path / "chats.jsonl").write_text(line + "\n" + line.replace("hello", "hey") + "\n",
                                        encoding="utf-16")
  with pytest.raises(UserError, match=r"No usable conversation .*1 undecodable"):
    conversations.open_chat(f"chat:{tmp_path}/*.jsonl", 0.5)
