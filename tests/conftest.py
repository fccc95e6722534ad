"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared tiny fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Broadcasting arrays of different ranks must be written out (x[:, None]), never implicit.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import hashlib  # noqa: E402
import pathlib  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

from llm_jax import config as config_lib  # noqa: E402
from llm_jax.parallel import sharding
from llm_jax.data.tokenizer import train_tokenizer  # noqa: E402
from llm_jax.model.transformer import ModelConfig, Transformer  # noqa: E402
from llm_jax.train import builder  # noqa: E402
from llm_jax.train.loop import train  # noqa: E402

TINY_OVERRIDES = [
    "model.vocab_size=512", "model.d_model=64", "model.num_layers=2", "model.num_heads=8",
    "model.num_kv_heads=4", "model.mlp_dim=128", "model.context_length=32",
    "train.batch_size=8", "train.steps=30", "train.warmup_steps=3", "train.log_every=5",
    "train.eval_every=10", "train.eval_tokens=512", "train.checkpoint_every=10",
    "train.sample_tokens=8", "train.learning_rate=3e-3",
    # Tests compare computations that should agree (cached and full forward passes, kernels,
    # meshes); bfloat16 operand rounding would amplify their float32 differences. The
    # bfloat16 path has its own tests (test_model.py, test_train.py).
    "model.matmul_precision=float32",
]


def tiny_config(*extra: str):
  """A ~100k-parameter model that compiles and steps in well under a second."""
  return config_lib.load_config(None, [*TINY_OVERRIDES, *extra])


def model_of(config) -> Transformer:
  """The model a run of `config` builds on this platform."""
  return Transformer(ModelConfig.from_config(config_lib.resolve(config).model))


def build(config, devices=None) -> builder.Built:
  """What a run of `config` computes with, on a mesh over `devices` (default: all)."""
  return builder.build(config_lib.resolve(config), sharding.make_mesh(config.mesh, devices))


def data_config(*overrides: str):
  """The default `data` section with `KEY=VALUE` overrides of its keys."""
  return config_lib.load_config(None, [f"data.{o}" for o in overrides]).data


def snapshot(directory: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`, to show nothing changed."""
  return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def stdlib_texts(count: int) -> list[str]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.py"))[:count]]


@pytest.fixture(scope="session")
def tokenizer():
  return train_tokenizer(stdlib_texts(40), 512)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> pathlib.Path:
  """A directory of real text files (a slice of the stdlib) for the files: source."""
  root = tmp_path_factory.mktemp("corpus")
  for i, text in enumerate(stdlib_texts(60)):
    (root / f"doc{i:03d}.py").write_text(text, encoding="utf-8")
  return root


@pytest.fixture(scope="session")
def pretrained_run(text_corpus, tmp_path_factory) -> pathlib.Path:
  """A tiny run (context 64) pretrained a few steps: where post-training tests start."""
  workdir = tmp_path_factory.mktemp("pretrained")
  train(tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=6",
                    "train.sample_tokens=0", "model.context_length=64"), workdir)
  return workdir
