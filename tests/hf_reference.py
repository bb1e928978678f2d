"""Tiny random `transformers` T5Gemma 2 models used as the numerics reference."""

import copy

import numpy as np
import torch
from transformers import T5Gemma2Config
from transformers import T5Gemma2ForConditionalGeneration

from keras_t5gemma.conversion.config import backbone_from_hf_config
from keras_t5gemma.conversion.weights import load_weights

TINY_TEXT = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "sliding_window": 4,
    "query_pre_attn_scalar": 8,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    },
}
TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 7,
    "vision_use_head": False,
}
BOI, EOI, IMAGE = 297, 298, 299


def tiny_config(text=None, decoder=None, vision=None, mm_tokens_per_image=4, special_ids=(BOI, EOI, IMAGE), **top):
    """A `config.json`-style dict; `text` overrides both stacks, `decoder` only the decoder.

    `special_ids` are the start-of-image, end-of-image and placeholder ids.
    """
    boi, eoi, image = special_ids
    encoder_text = {**copy.deepcopy(TINY_TEXT), **(text or {})}
    decoder_text = {**encoder_text, **(decoder or {})}
    return {
        "model_type": "t5gemma2",
        "encoder": {
            "text_config": encoder_text,
            "vision_config": {**TINY_VISION, **(vision or {})},
            "mm_tokens_per_image": mm_tokens_per_image,
            "boi_token_index": boi,
            "eoi_token_index": eoi,
        },
        "decoder": decoder_text,
        "image_token_index": image,
        **top,
    }


def reference_model(config, seed=0, model_class=T5Gemma2ForConditionalGeneration):
    """A `model_class` (default `T5Gemma2ForConditionalGeneration`) with every parameter random.

    The reference initialises norms and the end-of-image vector to zero, which
    would hide mapping mistakes, so all parameters are redrawn.
    """
    torch.manual_seed(seed)
    hf_config = T5Gemma2Config(**{k: v for k, v in config.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    model = model_class(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            std = 0.3 if parameter.ndim == 1 else 0.15
            if name.endswith("embed_tokens.weight"):
                # A small table keeps the residual stream from echoing the input
                # token, so random models generate varied sequences.
                std = 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def backbone_from_reference(model, config, text_only=True, dtype="float32"):
    """Builds a `T5Gemma2Backbone` and copies the reference weights into it."""
    backbone = backbone_from_hf_config(config, text_only=text_only, dtype=dtype)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    load_weights(backbone, state.keys(), state.__getitem__)
    return backbone


def reference_outputs(model, encoder_ids, encoder_mask, decoder_ids, decoder_mask):
    """Encoder output and decoder logits from the reference, as numpy."""
    with torch.no_grad():
        encoder = model.model.encoder(
            input_ids=torch.tensor(encoder_ids), attention_mask=torch.tensor(encoder_mask)
        ).last_hidden_state
        logits = model(
            input_ids=torch.tensor(encoder_ids),
            attention_mask=torch.tensor(encoder_mask),
            decoder_input_ids=torch.tensor(decoder_ids),
            decoder_attention_mask=torch.tensor(decoder_mask),
        ).logits
    return encoder.numpy(), logits.numpy()


def random_batch(rng, batch, encoder_lengths, decoder_lengths, encoder_length, decoder_length, vocab=296):
    """Right-padded token ids and masks with the given real lengths.

    Ids stay below the special image ids; the end-of-image id is sprinkled in
    so its learned embedding is exercised.
    """

    def side(lengths, length):
        ids = np.zeros((batch, length), "int64")
        mask = np.zeros((batch, length), "int64")
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.integers(3, vocab, n)
            mask[row, :n] = 1
        return ids, mask

    encoder_ids, encoder_mask = side(encoder_lengths, encoder_length)
    encoder_ids[0, 1] = EOI
    decoder_ids, decoder_mask = side(decoder_lengths, decoder_length)
    decoder_ids[:, 0] = 2
    return encoder_ids, encoder_mask, decoder_ids, decoder_mask
