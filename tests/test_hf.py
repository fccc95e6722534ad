"""Hugging Face import and export against transformers itself: logits, greedy generation,
bit-identical round trips, tokenizers, and one sentence for each kind of bad input."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_jax import cli, config as config_lib, hf
from llm_jax.inference import generate
from llm_jax.parallel import sharding
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer, rotary_inv_freq
from llm_jax.inference.run import load_run
from llm_jax.train.loop import train

from conftest import snapshot, stdlib_texts

TEXTS = ["  leading spaces\tand a tab", "line one\nline two\n\n", "café naïve résumé",
         "漢字とかな", "emoji 🙂🚀 done", "def f(x):\n    return x  # ok"]
TOKENIZER_SIZE = 300


@pytest.fixture(scope="module")
def hf_tokenizer():
  """A byte-level BPE like Llama 3's, wrapped as transformers wraps it."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(stdlib_texts(20), trainers.BpeTrainer(
      vocab_size=TOKENIZER_SIZE, special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


# GQA and an MLP wider than the model in both; tied and untied embeddings; Llama 3.1 rotary
# scaling; an explicit head_dim; a vocabulary padded past the tokenizer's size.
CASES = {
    "untied_padded": dict(vocab_size=TOKENIZER_SIZE + 20, tie_word_embeddings=False),
    "tied_llama3_head_dim": dict(
        vocab_size=TOKENIZER_SIZE, tie_word_embeddings=True, head_dim=24, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def _hf_model(case: str, **changes) -> transformers.LlamaForCausalLM:
  torch.manual_seed(0)
  config = dict(
      hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
      # Large weights make the next-token distribution peaked, so greedy decoding is decided
      # by clear margins rather than by float rounding.
      initializer_range=0.25)
  # A copy: transformers writes rope_theta into the rope_scaling dict it is given.
  config.update(copy.deepcopy(CASES[case]), **changes)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def _run_dir(source):
  return source.parent / "run"


def _import(model, root, hf_tokenizer):
  """(its HF directory, the imported run) of `model` saved and imported under `root`."""
  model.save_pretrained(root / "hf")
  hf_tokenizer.save_pretrained(root / "hf")
  hf.import_model(root / "hf", root / "run")
  run = load_run(root / "run")
  # Parity is checked in exact float32 (the CPU default rounds matmul operands to bfloat16).
  exact = Transformer(dataclasses.replace(run.model.config, matmul_precision="float32"))
  return root / "hf", dataclasses.replace(run, model=exact)


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, hf_tokenizer, tmp_path_factory):
  """(case, the HF model, its directory, the imported run)."""
  model = _hf_model(request.param)
  return (request.param, model,
          *_import(model, tmp_path_factory.mktemp(request.param), hf_tokenizer))


def _logit_difference(model, run, length: int) -> float:
  """The largest difference of our logits from transformers' over two random sequences."""
  tokens = np.random.default_rng(0).integers(0, TOKENIZER_SIZE, (2, length)).astype(np.int32)
  ours = np.asarray(run.model.apply({"params": run.params}, tokens))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  assert ours.shape == theirs.shape
  return np.abs(ours - theirs).max()


def test_logits_over_256_tokens_equal_transformers(imported):
  _, model, _, run = imported
  assert _logit_difference(model, run, 256) < 1e-4


def test_logits_over_384_tokens_at_rope_theta_500k_equal_transformers(hf_tokenizer, tmp_path):
  """Angles are position * frequency, so a frequency a last bit off transformers' shows late in
  long contexts: rope_theta^(-2i/H) gave 5.7e-4 here, its order of operations 7e-5."""
  model = _hf_model("tied_llama3_head_dim", head_dim=64, num_hidden_layers=3)
  assert model.config.rope_parameters["rope_theta"] == 500_000
  _, run = _import(model, tmp_path, hf_tokenizer)
  assert _logit_difference(model, run, 384) < 2e-4


# Ours take float32 pow correctly rounded, as torch's scalar pow (libm's) does. Where torch
# vectorizes it with SLEEF (within one ulp; AVX2 here), one frequency is a last bit off at some
# other widths: 96, 256, and 128 at rope_theta 1e6.
@pytest.mark.parametrize("head_dim, rope_theta", [
    (24, 500_000.0), (64, 10_000.0), (64, 1e6), (128, 10_000.0), (128, 500_000.0)])
def test_rotary_frequencies_equal_transformers_bit_for_bit(imported, head_dim, rope_theta):
  _, model, _, run = imported
  hf_config = copy.deepcopy(model.config)
  hf_config.head_dim = head_dim
  hf_config.rope_parameters["rope_theta"] = rope_theta
  theirs = type(model.model.rotary_emb)(hf_config).inv_freq.numpy()
  ours = rotary_inv_freq(dataclasses.replace(run.model.config, head_dim=head_dim,
                                             rope_theta=rope_theta))
  np.testing.assert_array_equal(ours, theirs)


def test_greedy_generation_with_our_cache_equals_transformers_generate(imported):
  _, model, _, run = imported
  prompts = [[0, 5, 17, 42, 99, 7], [0, 250, 3]]
  with sharding.activate(run.mesh):
    ours = generate.generate(run.params, run.model, prompts, 32, eos_id=-1)
  for prompt, new in zip(prompts, ours):
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the mask is explicit: bos is id 0, which generate takes for padding
      theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert new == theirs


def test_export_of_an_import_reloads_bit_identical(imported, tmp_path):
  case, model, source, _ = imported
  out = tmp_path / "out"
  hf.export_model(_run_dir(source), out)
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  original = model.state_dict()
  for name, tensor in reloaded.state_dict().items():
    assert torch.equal(tensor, original[name]), name
  exported = transformers.AutoTokenizer.from_pretrained(out)
  theirs = transformers.AutoTokenizer.from_pretrained(source)
  for text in TEXTS:
    assert exported(text).input_ids == theirs(text).input_ids, (case, text)


def test_tokenizer_of_the_import_encodes_as_transformers(imported):
  _, _, source, run = imported
  theirs = transformers.AutoTokenizer.from_pretrained(source)
  for text in TEXTS:
    assert run.tokenizer.encode(text) == theirs(text, add_special_tokens=False).input_ids
  assert (run.tokenizer.bos_id, run.tokenizer.eos_id) == (theirs.bos_token_id,
                                                          theirs.eos_token_id)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_16_bit_checkpoints_round_trip_bit_identical(dtype, hf_tokenizer, tmp_path):
  model = _hf_model("untied_padded").to(getattr(torch, dtype))
  model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  hf_tokenizer.save_pretrained(tmp_path / "hf")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  hf.import_model(tmp_path / "hf", tmp_path / "run")
  hf.export_model(tmp_path / "run", tmp_path / "out", dtype=dtype, max_shard_bytes=200_000)
  assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                              dtype=getattr(torch, dtype))
  original = model.state_dict()
  for name, tensor in reloaded.state_dict().items():
    assert tensor.dtype == getattr(torch, dtype) and torch.equal(tensor, original[name]), name


# --- bad input ------------------------------------------------------------------------------

def _hf_dir(root, hf_tokenizer, **config):
  model = _hf_model("untied_padded")
  for key, value in config.items():
    setattr(model.config, key, value)
  model.save_pretrained(root)
  hf_tokenizer.save_pretrained(root)
  return root


def _drop_tensor(path):
  from safetensors.torch import load_file, save_file
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _truncate(path):
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[:len(data) // 2])


def _edit_config(**changes):
  def edit(path):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
  return edit


@pytest.mark.parametrize("damage, words", [
    (lambda p: (p / "config.json").unlink(), "has no config.json"),
    (lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors"),
    (_drop_tensor, "no tensor model.layers.1.mlp.up_proj.weight"),
    (_edit_config(intermediate_size=128), "config.json implies"),
    (_truncate, "truncated"),
    (_edit_config(vocab_size=TOKENIZER_SIZE - 10), "tokenizer has 300 tokens"),
    (_edit_config(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel is not supported"),
    (_edit_config(attention_bias=True), "attention biases"),
    (_edit_config(architectures=["MistralForCausalLM"], sliding_window=128),
     "sliding window of 128 tokens"),
])
def test_bad_checkpoints_are_one_sentence_and_write_nothing(damage, words, hf_tokenizer,
                                                           tmp_path, capsys):
  source = _hf_dir(tmp_path / "hf", hf_tokenizer)
  damage(source)
  code = cli.main(["hf", "import", str(source), "--workdir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("llm-jax: error:")]
  assert code == 2 and len(errors) == 1 and words in errors[0], err
  assert "Traceback" not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no run, no staging left


def test_existing_targets_are_refused_and_left_as_they_were(imported, tmp_path, capsys):
  _, _, source, _ = imported
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "notes.txt").write_text("mine")
  before = snapshot(taken)
  assert cli.main(["hf", "import", str(source), "--workdir", str(taken)]) == 2
  assert cli.main(["hf", "export", "--workdir", str(_run_dir(source)), "--out",
                   str(taken)]) == 2
  assert snapshot(taken) == before
  assert capsys.readouterr().err.count("exists and is not empty") == 2


def test_an_import_is_not_a_run_to_resume_and_stays_as_it_was(imported):
  _, _, source, _ = imported
  run_dir = _run_dir(source)
  before = snapshot(run_dir)
  config = config_lib.from_json((run_dir / "config.json").read_text())
  with pytest.raises(UserError, match="holds imported parameters.*train.init_from"):
    train(config, run_dir)
  assert snapshot(run_dir) == before
