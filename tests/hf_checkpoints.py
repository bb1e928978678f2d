"""Tiny T5Gemma 2 checkpoints written the way Hugging Face ships them, and the first T5Gemma family's tiny
config (`tests/test_t5gemma.py`, `tests/test_t5gemma_classifiers.py`)."""

import json
from pathlib import Path

from hf_reference import reference_model
from hf_reference import tiny_config
from safetensors.numpy import load_file
from safetensors.numpy import save_file

# The small test vocabulary: 330 pieces, image markers at 4, 5 and 6.
VOCABULARY_SIZE = 330
SPECIAL_IDS = (4, 5, 6)
IMAGE_PROCESSOR = {
    "image_processor_type": "Gemma3ImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": 28, "width": 28},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_pan_and_scan": False,
}

# The first family's tiny stacks: unbalanced (the encoder wider, deeper, with more heads than the decoder, as
# 9b-2b), soft-capping on at values the random logits reach, odd windows.
T5GEMMA_ENCODER = {
    "vocab_size": VOCABULARY_SIZE,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "sliding_window": 3,
    "query_pre_attn_scalar": 8,
    "attn_logit_softcapping": 5.0,
    "final_logit_softcapping": 3.0,
}
T5GEMMA_DECODER = {
    **T5GEMMA_ENCODER,
    "hidden_size": 24,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 12,
}


def checkpoint_config(**overrides):
    text = {"vocab_size": VOCABULARY_SIZE, **overrides.pop("text", {})}
    return tiny_config(text=text, special_ids=SPECIAL_IDS, **overrides)


def write_checkpoint(directory, config, tokenizer_proto, seed=0, max_shard_size=None, model_class=None):
    """Saves a random reference model (a `model_class`, by default for generation) with tokenizer and
    image processor files.

    Returns the reference model (in memory, float32).
    """
    directory = Path(directory)
    model = reference_model(config, seed=seed, **({"model_class": model_class} if model_class else {}))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    (directory / "tokenizer.model").write_bytes(tokenizer_proto)
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    (directory / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR))
    return model


def randomised(model, seed):
    """A `transformers` model with every parameter random (norms and heads included), in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            std = 0.3 if parameter.ndim == 1 else 0.15
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def to_earlier_layout(directory):
    """Rewrites a checkpoint as earlier releases wrote it.

    The vision tower sits one level deeper (`vision_tower.vision_model.`),
    and the config spells RoPE as `rope_theta`/`rope_local_base_freq`/
    `rope_scaling` and the layer pattern as `sliding_window_pattern`.
    """
    directory = Path(directory)
    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()}
        save_file(renamed, path, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data))
    config = json.loads((directory / "config.json").read_text())
    for text in (config["encoder"]["text_config"], config["decoder"]):
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope["full_attention"]["rope_theta"]
        text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        text["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
        assert text.pop("layer_types") == ["sliding_attention", "full_attention", "sliding_attention"]
        text["sliding_window_pattern"] = 2
    (directory / "config.json").write_text(json.dumps(config))
