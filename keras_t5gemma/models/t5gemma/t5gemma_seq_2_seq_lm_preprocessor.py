"""Strings to T5Gemma encoder/decoder inputs, labels and weights (text only)."""

import keras

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_tokenizer import T5GemmaTokenizer
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5GemmaSeq2SeqLMPreprocessor(T5Gemma2Seq2SeqLMPreprocessor):
    """Prepares T5Gemma inputs as the reference trains and generates.

    The text layout of `T5Gemma2Seq2SeqLMPreprocessor`: encoder `<bos>` +
    prompt, decoder `<bos>` + target, labels the target + `<eos>`,
    `sample_weight` 0 on padding. Text only: no images, and
    `<start_of_image>` in a prompt is plain text.

    Args:
        tokenizer: a `T5GemmaTokenizer`.
        encoder_sequence_length, decoder_sequence_length: padded lengths.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the prompt.

    Example:
    ```python
    import io
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["translate: hello", "bonjour", "good morning"]),
        model_writer=model, model_type="bpe", vocab_size=50,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        hard_vocab_limit=False,
    )
    preprocessor = T5GemmaSeq2SeqLMPreprocessor(
        T5GemmaTokenizer(model.getvalue()), encoder_sequence_length=16, decoder_sequence_length=8
    )
    x, y, sample_weight = preprocessor({"encoder_text": ["translate: hello"], "decoder_text": ["bonjour"]})
    ```
    """

    backbone_cls = T5GemmaBackbone
    tokenizer_cls = T5GemmaTokenizer
    image_converter_cls = None

    def __init__(
        self,
        tokenizer,
        encoder_sequence_length=512,
        decoder_sequence_length=512,
        add_start_token=True,
        add_end_token=False,
        **kwargs,
    ):
        if kwargs.pop("image_converter", None) is not None:
            raise ValueError("T5Gemma is a text-only model; its preprocessor takes no image converter.")
        super().__init__(
            tokenizer,
            image_converter=None,
            encoder_sequence_length=encoder_sequence_length,
            decoder_sequence_length=decoder_sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )

    def _expanded_prompts(self, text):
        return self._tokenize(text)

    def get_config(self):
        config = super().get_config()
        for name in ("image_converter", "image_size", "num_vision_tokens_per_image", "max_images_per_prompt"):
            config.pop(name, None)
        return config
