"""Counts the parameters of a released T5Gemma 2 config, here and in the reference.

Builds the backbone (random weights, bfloat16 to halve memory) from a Hugging
Face `config.json` and the reference model on PyTorch's meta device, and
prints both counts.

    python tools/count_parameters.py tests/data/t5gemma-2-270m-270m.json

The reference ties the encoder table, decoder table and LM head (one tensor),
so its unique count is what a port numerically identical to it must have.
KerasHub's preset metadata lists 953,800,816 for 270m-270m: that figure counts
the table twice and the end-of-image vector not at all (see the last line).
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")


def reference_count(config):
    import torch
    from transformers import T5Gemma2Config
    from transformers import T5Gemma2ForConditionalGeneration

    with torch.device("meta"):
        model = T5Gemma2ForConditionalGeneration(
            T5Gemma2Config(**{k: v for k, v in config.items() if k != "model_type"})
        )
    return model.num_parameters()


def our_count(config):
    from keras_t5gemma.conversion.config import backbone_from_hf_config

    backbone = backbone_from_hf_config(config, dtype="bfloat16")
    return backbone.count_params(), backbone.vocabulary_size * backbone.hidden_dim, backbone.hidden_dim


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a T5Gemma 2 config.json")
    args = parser.parse_args()
    config = json.load(open(args.config))
    ours, table, hidden = our_count(config)
    reference = reference_count(config)
    print(f"keras_t5gemma backbone parameters: {ours:,}")
    print(f"transformers unique parameters:   {reference:,}")
    print(f"counting the tied table twice and no end-of-image vector: {ours + table - hidden:,}")
    return ours, reference


if __name__ == "__main__":
    main()
