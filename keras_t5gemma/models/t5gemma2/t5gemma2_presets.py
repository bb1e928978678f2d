"""T5Gemma 2 presets: the released checkpoints and the bundled demo.

Released checkpoints resolve to their Hugging Face handles and are converted on
load; `bundled://` presets are Keras preset folders shipped in
`keras_t5gemma/presets/`. Parameter counts are the backbone's (vision tower
included), equal to `transformers`' count of unique parameters: T5Gemma 2 ties
one embedding table across encoder, decoder and output, and that table is
counted once. Registered in `keras_t5gemma/models/__init__.py`.
"""

backbone_presets = {
    "t5gemma2_tiny_digits": {
        "handle": "bundled://t5gemma2_tiny_digits",
        "params": 280_352,
        "description": (
            "Tiny T5Gemma 2 (0.28M parameters, vision tower included) trained from scratch to reverse and sort "
            "digit sequences and name an image's colour; a demo, not a language model."
        ),
    },
    "t5gemma2_270m_270m": {
        "handle": "hf://google/t5gemma-2-270m-270m",
        "params": 786_029_296,
        "description": "T5Gemma 2 270M encoder + 270M decoder (Gemma 3 270M), SigLIP vision, pretrained.",
    },
    "t5gemma2_1b_1b": {
        "handle": "hf://google/t5gemma-2-1b-1b",
        "params": 2_115_977_456,
        "description": "T5Gemma 2 1B encoder + 1B decoder (Gemma 3 1B), SigLIP vision, pretrained.",
    },
    "t5gemma2_4b_4b": {
        "handle": "hf://google/t5gemma-2-4b-4b",
        "params": 7_508_928_880,
        "description": "T5Gemma 2 4B encoder + 4B decoder (Gemma 3 4B), SigLIP vision, pretrained.",
    },
}
