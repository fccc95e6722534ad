import numpy as np
import pytest

from llm_jax.data import pipeline, sources
from llm_jax.errors import UserError


def _documents_from_batches(batches, tokenizer):
  """Rebuilds the token stream of every document piece from packed model inputs."""
  pieces = []
  for batch in batches:
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    segs = np.concatenate([batch["segment_ids"], batch["segment_ids"][:, -1:]], axis=1)
    for row, seg in zip(rows, segs):
      for s in np.unique(seg[seg > 0]):
        pieces.append(row[seg == s].tolist())
  return pieces


def test_packing_loses_nothing_and_keeps_documents_apart(tokenizer):
  docs = ["alpha beta gamma " * n for n in range(1, 9)] + ["x = 1\n" * 40]
  ds = pipeline.packed_dataset(docs, tokenizer, context_length=16, batch_size=4, seed=None,
                               repeat=False)
  batches = list(ds)
  stream = [t for piece in _documents_from_batches(batches, tokenizer) for t in piece]
  expected = [t for d in docs for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
  # Rows overlap by nothing and drop nothing: the concatenated pieces are every document.
  assert stream[:len(expected)] == expected and len(stream) >= len(expected)
  for batch in batches:
    seg = batch["segment_ids"]
    # A target is weighted only when it belongs to the same document as its input.
    same = np.concatenate([seg[:, 1:] == seg[:, :-1], np.ones((len(seg), 1), bool)], axis=1)
    assert np.all(batch["weights"][~same] == 0)
    assert np.all(batch["weights"][seg == 0] == 0)
    # Positions restart at every new piece.
    starts = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.all(batch["positions"][starts & (seg > 0)] == 0)


def test_same_seed_same_batches_different_seed_different_order(tokenizer):
  docs = [f"document number {i} " * (i % 7 + 1) for i in range(50)]

  def first(seed):
    it = iter(pipeline.packed_dataset(docs, tokenizer, 16, 4, seed=seed, repeat=True))
    return [next(it)["inputs"] for _ in range(3)]

  assert all(np.array_equal(a, b) for a, b in zip(first(1), first(1)))
  assert not all(np.array_equal(a, b) for a, b in zip(first(1), first(2)))


def test_iterator_state_resumes_exactly(tokenizer):
  docs = [f"text {i} " * (i % 11 + 1) for i in range(40)]
  ds = pipeline.packed_dataset(docs, tokenizer, 16, 4, seed=0, repeat=True)
  it = iter(ds)
  for _ in range(5):
    next(it)
  saved = it.get_state()
  expected = [next(it)["inputs"] for _ in range(4)]
  resumed = iter(ds)
  resumed.set_state(saved)
  assert all(np.array_equal(a, next(resumed)["inputs"]) for a in expected)


def test_files_source_skips_and_counts_bad_files(tmp_path):
  (tmp_path / "good.txt").write_text("hello world\n" * 10)
  (tmp_path / "good2.md").write_text("# title\nsome text\n")
  (tmp_path / "empty.txt").write_text("   \n")
  (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02abc")
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  corpus = sources.load_corpus(f"files:{tmp_path}/*", val_fraction=0.5)
  assert len(corpus.train) + len(corpus.validation) == 2
  assert corpus.skipped == {"unreadable": 0, "binary": 1, "undecodable": 1, "empty": 1,
                            "duplicate": 0}
  assert "1 binary" in corpus.summary()


def test_builtin_corpus_split_is_deterministic():
  a = sources.load_corpus("builtin", 0.02)
  b = sources.load_corpus("builtin", 0.02)
  assert a.validation == b.validation and len(a.validation) > 0
  assert not set(a.validation) & set(a.train)


@pytest.mark.parametrize("source, words", [
    ("files:/nonexistent/**/*.txt", "matches no files"),
    ("web:http://x", "not a known source"),
])
def test_bad_sources(source, words):
  with pytest.raises(UserError, match=words):
    sources.load_corpus(source, 0.1)


def test_corpus_with_nothing_usable(tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(UserError, match="No usable text"):
    sources.load_corpus(f"files:{tmp_path}/*.txt", 0.1)


def test_evaluation_batches_cover_every_document_and_ignore_process_count(tokenizer):
  docs = [f"doc{i} " + "word " * (30 * (i + 1)) for i in range(6)]
  single = pipeline.evaluation_batches(docs, tokenizer, 16, batch_size=8, num_batches=2)
  first_rows = single[0]["inputs"][:6, 0]
  assert np.all(first_rows == tokenizer.bos_id)  # row-major over documents: all starts first
  halves = [pipeline.evaluation_batches(docs, tokenizer, 16, 8, 2, process_index=p,
                                        process_count=2) for p in (0, 1)]
  for b in range(2):
    for key in single[b]:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][b][key], halves[1][b][key]]), single[b][key])
