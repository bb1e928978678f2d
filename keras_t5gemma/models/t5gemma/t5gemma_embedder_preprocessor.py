"""Strings to T5Gemma encoder inputs, for embeddings (text only)."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm_preprocessor import T5GemmaSeq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma.t5gemma_tokenizer import T5GemmaTokenizer
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder_preprocessor import T5Gemma2EmbedderPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaEmbedderPreprocessor(T5Gemma2EmbedderPreprocessor):
    """Prepares text for `T5GemmaEmbedder`: `T5Gemma2EmbedderPreprocessor` without images.

    Prompts are laid out as `T5GemmaSeq2SeqLMPreprocessor` lays out encoder
    prompts: `<bos>` + prompt, right-padded (and truncated) to
    `sequence_length`.

    Args:
        tokenizer: a `T5GemmaTokenizer`.
        sequence_length: int, padded length.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the prompt.
    """

    backbone_cls = T5GemmaBackbone
    tokenizer_cls = T5GemmaTokenizer
    image_converter_cls = None
    prompt_preprocessor_cls = T5GemmaSeq2SeqLMPreprocessor

    def __init__(self, tokenizer, sequence_length=512, add_start_token=True, add_end_token=False, **kwargs):
        if kwargs.pop("image_converter", None) is not None:
            raise ValueError("T5Gemma is a text-only model; its preprocessor takes no image converter.")
        for name in ("mm_tokens_per_image", "max_images_per_prompt"):
            kwargs.pop(name, None)
        super().__init__(
            tokenizer,
            image_converter=None,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        for name in ("mm_tokens_per_image", "max_images_per_prompt"):
            config.pop(name, None)
        return config
