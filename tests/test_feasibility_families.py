"""`--model-config` for every mainstream decoder family: the shape's parameter count equals the
instantiated model's, its forward FLOPs match torch's FlopCounterMode within 2 %, its largest
layer is DeepSpeed's, and what the shape cannot describe is refused with what differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ConfigError
from components.feasibility.estimate import FeasibilityConfig, ModelSource, estimate
from components.feasibility.flops import forward_flops_per_token
from components.feasibility.published import FAMILY_EXAMPLES
from components.feasibility.shapes import shape_from_hf_config
from components.models.factory import CLASSES, ModelConfig, hf_config

IDS = [label for label, _, _ in FAMILY_EXAMPLES]


def _config(model_type: str, kwargs: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, attn_implementation="eager", **kwargs)


def _model(config):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("label", "model_type", "kwargs"), FAMILY_EXAMPLES, ids=IDS)
def test_parameter_count_equals_the_instantiated_model(label: str, model_type: str, kwargs: dict) -> None:
    config = _config(model_type, kwargs)
    shape, counted = shape_from_hf_config(config)
    assert shape.parameter_count() == counted == sum(p.numel() for p in _model(config).parameters())


@pytest.mark.parametrize(("label", "model_type", "kwargs"), FAMILY_EXAMPLES, ids=IDS)
def test_forward_flops_match_flop_counter_mode(label: str, model_type: str, kwargs: dict) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = _config(model_type, kwargs)
    shape, _ = shape_from_hf_config(config)
    tokens = torch.randint(3, shape.vocab_size, (2, shape.seq_len))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _model(config)(input_ids=tokens)
    measured = counter.get_total_flops() / tokens.numel()
    assert forward_flops_per_token(shape) == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize(("label", "model_type", "kwargs"), FAMILY_EXAMPLES, ids=IDS)
def test_largest_layer_is_deepspeeds(label: str, model_type: str, kwargs: dict) -> None:
    """DeepSpeed's `model_to_params` walk; the examples' vocabulary is small enough that a
    projection (fused or not, with its bias) is the largest module ZeRO-3 gathers."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = _config(model_type, kwargs)
    shape, _ = shape_from_hf_config(config)
    total, largest = model_to_params(_model(config))
    assert (shape.parameter_count(), shape.largest_layer_parameters()) == (total, largest)
    assert largest > shape.embedding_parameters()


def test_independent_head_width_changes_attention_flops() -> None:
    """Gemma 2 / Qwen3 / Mistral: heads of head_dim, not d_model / heads, in parameters and FLOPs."""
    label, model_type, kwargs = next(example for example in FAMILY_EXAMPLES if example[1] == "qwen3")
    wide, _ = shape_from_hf_config(_config(model_type, kwargs))
    default, _ = shape_from_hf_config(_config(model_type, {**kwargs, "head_dim": 16}))
    assert (wide.head_dim, wide.q_dim, default.q_dim) == (24, 96, 64)
    assert forward_flops_per_token(wide) > forward_flops_per_token(default)


@pytest.mark.parametrize(("label", "model_type", "kwargs"), FAMILY_EXAMPLES, ids=IDS)
def test_config_json_is_read_from_disk(tmp_path: Path, label: str, model_type: str, kwargs: dict) -> None:
    config = _config(model_type, kwargs)
    config.save_pretrained(tmp_path)
    result = estimate(FeasibilityConfig(model=ModelSource(config_path=str(tmp_path)), tokens=1e9, gpu="H100-SXM",
                                        num_gpus=1))
    assert result["params"] == sum(p.numel() for p in _model(config).parameters())
    assert result["fits"] is True and result["memory_checked"]


def test_a_variant_the_shape_cannot_describe_is_refused_with_what_differs() -> None:
    """GPT-2 with cross-attention has parameters no decoder shape holds."""
    from components.feasibility.shapes import shape_of_config

    config = _config("gpt2", dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  add_cross_attention=True))
    with pytest.raises(ConfigError) as error:
        shape_from_hf_config(config)
    message = str(error.value)
    model, shape = _model(config), shape_of_config(config)
    layer = sum(p.numel() for p in model.transformer.h[0].parameters())
    outside = sum(p.numel() for p in model.parameters()) - 2 * layer
    assert f"the gpt2 model has {sum(p.numel() for p in model.parameters()):,} parameters" in message
    assert (f"per layer: model {layer:,}, shape {shape.layer_parameters():,}; outside the layers: model {outside:,}, "
            f"shape {shape.outside_layer_parameters():,}") in message
    assert layer > shape.layer_parameters() and outside == shape.outside_layer_parameters()
    assert "crossattention.c_attn.weight (64, 128)" in message and "this variant is not supported" in message


def test_unsupported_family_is_named_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"model_type 'mixtral' is not supported by the shape reader "
                                          r"\(a mixture-of-experts MLP"):
        shape_from_hf_config(_config("mixtral", dict(vocab_size=100, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2)))


@pytest.mark.parametrize("architecture", list(CLASSES))
def test_every_factory_family_is_estimated_with_its_exact_parameter_count(tmp_path: Path, architecture: str) -> None:
    """The configs `build_causal_lm` writes (`pretrain.model.architecture`), read from disk."""
    config = hf_config(ModelConfig(architecture=architecture, hidden_size=64, num_layers=2, num_heads=4,
                                   num_kv_heads=4 if architecture == "gpt2" else 2, intermediate_size=128,
                                   max_position_embeddings=64), 128, {"bos_token_id": 1, "eos_token_id": 2,
                                                                      "pad_token_id": 0})
    config.save_pretrained(tmp_path)
    result = estimate(FeasibilityConfig(model=ModelSource(config_path=str(tmp_path)), tokens=1e9, gpu="H100-SXM",
                                        num_gpus=1))
    assert result["params"] == sum(p.numel() for p in _model(config).parameters())
    assert result["fits"] is True and result["memory_checked"]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "olmo2", "gpt2"])
def test_the_pretrain_estimate_counts_the_family_pretrain_builds(architecture: str) -> None:
    """`pretrain`'s feasibility gate reads the shape of the model it will build, for every family."""
    import torch
    from transformers import AutoModelForCausalLM

    from components.feasibility.training import model_shape
    from components.models.factory import ModelConfig, hf_config

    config = ModelConfig(architecture=architecture, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=4 if architecture == "gpt2" else 2, intermediate_size=128)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(hf_config(config, 400, {"bos_token_id": None, "eos_token_id": None,
                                                                         "pad_token_id": None}))
    assert model_shape(config, 400, 128).parameter_count() == sum(p.numel() for p in built.parameters())
