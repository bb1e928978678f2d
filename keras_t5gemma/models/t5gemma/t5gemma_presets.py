"""T5Gemma (first generation) presets: the 32 released checkpoints.

Each resolves to its Hugging Face handle (`google/t5gemma-<size>-<objective>[-it]`)
and is converted on load. Parameter counts are `transformers`' count of the
model (encoder table, decoder table tied to the output projection, counted
once); `tests/test_t5gemma.py` checks them against the configs in
`tests/data/t5gemma-*.json`, reconstructed from the published sizes. The ml-ml
config could not be reconstructed from public facts; its count is the one
KerasHub publishes, which equals `transformers`' for every other size.
Registered in `keras_t5gemma/models/__init__.py`.
"""

backbone_presets = {
    "t5gemma_s_s_prefixlm": {
        "handle": "hf://google/t5gemma-s-s-prefixlm",
        "params": 312_517_632,
        "description": "T5Gemma s-s: T5 Small-sized (8 layers, width 512), PrefixLM-pretrained.",
    },
    "t5gemma_s_s_prefixlm_it": {
        "handle": "hf://google/t5gemma-s-s-prefixlm-it",
        "params": 312_517_632,
        "description": "T5Gemma s-s: T5 Small-sized (8 layers, width 512), PrefixLM, instruction-tuned.",
    },
    "t5gemma_s_s_ul2": {
        "handle": "hf://google/t5gemma-s-s-ul2",
        "params": 312_517_632,
        "description": "T5Gemma s-s: T5 Small-sized (8 layers, width 512), UL2-pretrained.",
    },
    "t5gemma_s_s_ul2_it": {
        "handle": "hf://google/t5gemma-s-s-ul2-it",
        "params": 312_517_632,
        "description": "T5Gemma s-s: T5 Small-sized (8 layers, width 512), UL2, instruction-tuned.",
    },
    "t5gemma_b_b_prefixlm": {
        "handle": "hf://google/t5gemma-b-b-prefixlm",
        "params": 591_490_560,
        "description": "T5Gemma b-b: T5 Base-sized (12 layers, width 768), PrefixLM-pretrained.",
    },
    "t5gemma_b_b_prefixlm_it": {
        "handle": "hf://google/t5gemma-b-b-prefixlm-it",
        "params": 591_490_560,
        "description": "T5Gemma b-b: T5 Base-sized (12 layers, width 768), PrefixLM, instruction-tuned.",
    },
    "t5gemma_b_b_ul2": {
        "handle": "hf://google/t5gemma-b-b-ul2",
        "params": 591_490_560,
        "description": "T5Gemma b-b: T5 Base-sized (12 layers, width 768), UL2-pretrained.",
    },
    "t5gemma_b_b_ul2_it": {
        "handle": "hf://google/t5gemma-b-b-ul2-it",
        "params": 591_490_560,
        "description": "T5Gemma b-b: T5 Base-sized (12 layers, width 768), UL2, instruction-tuned.",
    },
    "t5gemma_l_l_prefixlm": {
        "handle": "hf://google/t5gemma-l-l-prefixlm",
        "params": 1_241_761_792,
        "description": "T5Gemma l-l: T5 Large-sized (24 layers, width 1024), PrefixLM-pretrained.",
    },
    "t5gemma_l_l_prefixlm_it": {
        "handle": "hf://google/t5gemma-l-l-prefixlm-it",
        "params": 1_241_761_792,
        "description": "T5Gemma l-l: T5 Large-sized (24 layers, width 1024), PrefixLM, instruction-tuned.",
    },
    "t5gemma_l_l_ul2": {
        "handle": "hf://google/t5gemma-l-l-ul2",
        "params": 1_241_761_792,
        "description": "T5Gemma l-l: T5 Large-sized (24 layers, width 1024), UL2-pretrained.",
    },
    "t5gemma_l_l_ul2_it": {
        "handle": "hf://google/t5gemma-l-l-ul2-it",
        "params": 1_241_761_792,
        "description": "T5Gemma l-l: T5 Large-sized (24 layers, width 1024), UL2, instruction-tuned.",
    },
    "t5gemma_ml_ml_prefixlm": {
        "handle": "hf://google/t5gemma-ml-ml-prefixlm",
        "params": 2_200_345_344,
        "description": "T5Gemma ml-ml: T5 Medium-Large size, PrefixLM-pretrained.",
    },
    "t5gemma_ml_ml_prefixlm_it": {
        "handle": "hf://google/t5gemma-ml-ml-prefixlm-it",
        "params": 2_200_345_344,
        "description": "T5Gemma ml-ml: T5 Medium-Large size, PrefixLM, instruction-tuned.",
    },
    "t5gemma_ml_ml_ul2": {
        "handle": "hf://google/t5gemma-ml-ml-ul2",
        "params": 2_200_345_344,
        "description": "T5Gemma ml-ml: T5 Medium-Large size, UL2-pretrained.",
    },
    "t5gemma_ml_ml_ul2_it": {
        "handle": "hf://google/t5gemma-ml-ml-ul2-it",
        "params": 2_200_345_344,
        "description": "T5Gemma ml-ml: T5 Medium-Large size, UL2, instruction-tuned.",
    },
    "t5gemma_xl_xl_prefixlm": {
        "handle": "hf://google/t5gemma-xl-xl-prefixlm",
        "params": 3_766_980_608,
        "description": "T5Gemma xl-xl: T5 XL-sized (24 layers, width 2048), PrefixLM-pretrained.",
    },
    "t5gemma_xl_xl_prefixlm_it": {
        "handle": "hf://google/t5gemma-xl-xl-prefixlm-it",
        "params": 3_766_980_608,
        "description": "T5Gemma xl-xl: T5 XL-sized (24 layers, width 2048), PrefixLM, instruction-tuned.",
    },
    "t5gemma_xl_xl_ul2": {
        "handle": "hf://google/t5gemma-xl-xl-ul2",
        "params": 3_766_980_608,
        "description": "T5Gemma xl-xl: T5 XL-sized (24 layers, width 2048), UL2-pretrained.",
    },
    "t5gemma_xl_xl_ul2_it": {
        "handle": "hf://google/t5gemma-xl-xl-ul2-it",
        "params": 3_766_980_608,
        "description": "T5Gemma xl-xl: T5 XL-sized (24 layers, width 2048), UL2, instruction-tuned.",
    },
    "t5gemma_2b_2b_prefixlm": {
        "handle": "hf://google/t5gemma-2b-2b-prefixlm",
        "params": 5_596_853_760,
        "description": "T5Gemma 2b-2b: Gemma 2 2B encoder and decoder, PrefixLM-pretrained.",
    },
    "t5gemma_2b_2b_prefixlm_it": {
        "handle": "hf://google/t5gemma-2b-2b-prefixlm-it",
        "params": 5_596_853_760,
        "description": "T5Gemma 2b-2b: Gemma 2 2B encoder and decoder, PrefixLM, instruction-tuned.",
    },
    "t5gemma_2b_2b_ul2": {
        "handle": "hf://google/t5gemma-2b-2b-ul2",
        "params": 5_596_853_760,
        "description": "T5Gemma 2b-2b: Gemma 2 2B encoder and decoder, UL2-pretrained.",
    },
    "t5gemma_2b_2b_ul2_it": {
        "handle": "hf://google/t5gemma-2b-2b-ul2-it",
        "params": 5_596_853_760,
        "description": "T5Gemma 2b-2b: Gemma 2 2B encoder and decoder, UL2, instruction-tuned.",
    },
    "t5gemma_9b_2b_prefixlm": {
        "handle": "hf://google/t5gemma-9b-2b-prefixlm",
        "params": 12_292_375_296,
        "description": "T5Gemma 9b-2b: Gemma 2 9B encoder, 2B decoder, PrefixLM-pretrained.",
    },
    "t5gemma_9b_2b_prefixlm_it": {
        "handle": "hf://google/t5gemma-9b-2b-prefixlm-it",
        "params": 12_292_375_296,
        "description": "T5Gemma 9b-2b: Gemma 2 9B encoder, 2B decoder, PrefixLM, instruction-tuned.",
    },
    "t5gemma_9b_2b_ul2": {
        "handle": "hf://google/t5gemma-9b-2b-ul2",
        "params": 12_292_375_296,
        "description": "T5Gemma 9b-2b: Gemma 2 9B encoder, 2B decoder, UL2-pretrained.",
    },
    "t5gemma_9b_2b_ul2_it": {
        "handle": "hf://google/t5gemma-9b-2b-ul2-it",
        "params": 12_292_375_296,
        "description": "T5Gemma 9b-2b: Gemma 2 9B encoder, 2B decoder, UL2, instruction-tuned.",
    },
    "t5gemma_9b_9b_prefixlm": {
        "handle": "hf://google/t5gemma-9b-9b-prefixlm",
        "params": 20_333_401_088,
        "description": "T5Gemma 9b-9b: Gemma 2 9B encoder and decoder, PrefixLM-pretrained.",
    },
    "t5gemma_9b_9b_prefixlm_it": {
        "handle": "hf://google/t5gemma-9b-9b-prefixlm-it",
        "params": 20_333_401_088,
        "description": "T5Gemma 9b-9b: Gemma 2 9B encoder and decoder, PrefixLM, instruction-tuned.",
    },
    "t5gemma_9b_9b_ul2": {
        "handle": "hf://google/t5gemma-9b-9b-ul2",
        "params": 20_333_401_088,
        "description": "T5Gemma 9b-9b: Gemma 2 9B encoder and decoder, UL2-pretrained.",
    },
    "t5gemma_9b_9b_ul2_it": {
        "handle": "hf://google/t5gemma-9b-9b-ul2-it",
        "params": 20_333_401_088,
        "description": "T5Gemma 9b-9b: Gemma 2 9B encoder and decoder, UL2, instruction-tuned.",
    },
}
