import pytest

from llm_jax import config as config_lib
from llm_jax.errors import UserError

from conftest import tiny_config


def _error(config, devices=8) -> str:
  with pytest.raises(UserError) as info:
    config_lib.validate(config, devices)
  return str(info.value)


def test_defaults_and_tiny_config_are_valid():
  config_lib.validate(config_lib.load_config(None), 1)
  config_lib.validate(tiny_config(), 8)


def test_overrides_parse_to_the_declared_type():
  c = tiny_config("model.num_layers=8", "model.tie_embeddings=false", "train.learning_rate=1e-4",
                  "data.source=files:/x/*.txt", "mesh.fsdp=-1")
  assert c.model.num_layers == 8 and isinstance(c.model.num_layers, int)
  assert c.model.tie_embeddings is False
  assert c.train.learning_rate == pytest.approx(1e-4)
  assert c.data.source == "files:/x/*.txt"


@pytest.mark.parametrize("override, words", [
    ("model.num_layerz=3", ["model.num_layerz", "model.num_layers"]),
    ("train.nope=1", ["train.nope"]),
    ("model.num_layers=three", ["model.num_layers", "int", "three"]),
])
def test_bad_override_names_the_key(override, words):
  with pytest.raises(UserError) as info:
    tiny_config(override)
  assert all(w in str(info.value) for w in words)


@pytest.mark.parametrize("overrides, words", [
    (["model.num_heads=6"], ["model.num_heads=6", "model.d_model=64"]),
    (["model.num_kv_heads=3"], ["model.num_kv_heads=3", "model.num_heads=8"]),
    (["mesh.data=3", "mesh.fsdp=1"], ["= 3", "8 devices"]),
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"], ["4", "8 devices"]),
    (["train.batch_size=12"], ["train.batch_size=12", "8"]),
    (["model.num_layers=0"], ["model.num_layers=0", "positive"]),
    (["model.d_model=-64"], ["model.d_model=-64", "positive"]),
    (["train.steps=0"], ["train.steps=0"]),
    (["model.dtype=float16"], ["model.dtype", "bfloat16"]),
    (["mesh.tensor=16", "mesh.fsdp=1"], ["16"]),
    (["model.head_dim=7"], ["model.head_dim=7", "even"]),
    (["model.head_dim=-8"], ["model.head_dim=-8"]),
    (["model.d_model=40"], ["model.d_model / model.num_heads = 5", "even", "model.head_dim"]),
    (["model.rope_scaling=yarn"], ["model.rope_scaling='yarn'", "llama3"]),
    (["model.rope_scaling_factor=0"], ["model.rope_scaling_factor=0", "positive"]),
    (["model.rope_low_freq_factor=-1"], ["model.rope_low_freq_factor=-1", "positive"]),
    (["model.rope_original_context=0"], ["model.rope_original_context=0", "positive"]),
    (["model.rope_high_freq_factor=1"], ["model.rope_high_freq_factor=1.0",
                                         "model.rope_low_freq_factor=1.0"]),
])
def test_validation_names_key_value_and_fix(overrides, words):
  message = _error(tiny_config(*overrides))
  assert all(w in message for w in words), message


def test_an_explicit_head_dim_frees_num_heads_from_dividing_d_model():
  config_lib.validate(tiny_config("model.num_heads=6", "model.num_kv_heads=3",
                                  "model.head_dim=16"), 8)


def test_a_config_saved_before_a_model_key_existed_has_its_default():
  saved = tiny_config()
  del saved.model["head_dim"]
  assert config_lib.model_differences(saved, tiny_config()) == []
  assert config_lib.model_differences(saved, tiny_config("model.head_dim=16")) == [
      "model.head_dim: 0 -> 16"]


def test_mesh_fill_axis():
  c = tiny_config("mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2")
  assert config_lib.resolve_mesh_shape(c.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_unknown_preset_and_missing_file():
  with pytest.raises(UserError, match="llama2-7b"):
    config_lib.load_config("configs/llama.py:llama9")
  with pytest.raises(UserError, match="does not exist"):
    config_lib.load_config("configs/nope.py")
