"""Builds T5Gemma (first generation) models from Hugging Face checkpoints (`hf://` handles or local folders).

Registered for `model_type` "t5gemma" in `keras_t5gemma/conversion/__init__.py`.
The tokenizer files and their `<bos>`/`<eos>` convention are read as for
T5Gemma 2 (`T5Gemma2CheckpointLoader`); the model is text only.
"""

from keras_t5gemma.conversion.preset_loader import T5Gemma2CheckpointLoader
from keras_t5gemma.conversion.t5gemma_config import backbone_from_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import check_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import is_encoder_only_config
from keras_t5gemma.conversion.t5gemma_config import load_t5gemma_weights
from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM


class T5GemmaCheckpointLoader(T5Gemma2CheckpointLoader):
    """Builds T5Gemma models from a Hugging Face checkpoint.

    `load_backbone` takes the backbone options as for T5Gemma 2 (`text_only`
    has nothing to skip: T5Gemma is text only).
    """

    @staticmethod
    def check_config(config):
        check_t5gemma_config(config)

    def check_backbone_class(self):
        return T5GemmaBackbone

    def load_backbone(
        self,
        cls,
        load_weights_=True,
        encoder_only=False,
        progress=None,
        dtype=None,
        quantize=None,
        remat=False,
        text_only=False,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"Unexpected arguments for a T5Gemma checkpoint: {sorted(kwargs)}.")
        if not issubclass(cls, T5GemmaBackbone):
            raise ValueError(
                f"`{self.preset}` is a T5Gemma (first generation) checkpoint; load it with `T5GemmaBackbone` or "
                f"`T5GemmaSeq2SeqLM`, not `{cls.__name__}`."
            )

        if is_encoder_only_config(self.config):
            # The checkpoint holds no decoder (`is_encoder_decoder: false`): the backbone builds none.
            encoder_only = True

        def build(policy):
            return backbone_from_t5gemma_config(
                self.config, encoder_only=encoder_only, dtype=policy, cls=cls, remat=remat
            )

        return self.build_and_fill(build, dtype, quantize, load_weights_, progress, load_t5gemma_weights)

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        if is_encoder_only_config(self.config) and issubclass(cls, T5Gemma2Seq2SeqLM):
            raise ValueError(
                f"`{self.preset}` holds a T5Gemma encoder alone (`is_encoder_decoder: false`), and "
                f"`{cls.__name__}` needs the decoder. Load it with `T5GemmaEmbedder`, `T5GemmaTextClassifier` "
                "or `T5GemmaTokenClassifier`."
            )
        return super().load_task(cls, load_weights, load_task_weights, **kwargs)

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        return self.tokenizer_from_checkpoint(cls, **kwargs)

    def load_image_converter(self, cls, **kwargs):
        return None

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        kwargs = cls._add_missing_kwargs(self, kwargs)
        add_bos, add_eos = self._special_tokens_added()
        kwargs.setdefault("add_start_token", add_bos)
        kwargs.setdefault("add_end_token", add_eos)
        return cls(**kwargs)
