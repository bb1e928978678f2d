"""Builds T5Gemma 2 models from Hugging Face checkpoints (`hf://` handles or local folders).

Registered for `model_type` "t5gemma2" in `keras_t5gemma/conversion/__init__.py`,
so that every class's `from_preset` (see `keras_t5gemma.utils.preset_utils`)
converts such checkpoints on load.
"""

from keras_t5gemma.conversion.checkpoint import HFCheckpoint
from keras_t5gemma.conversion.checkpoint import ReadAhead
from keras_t5gemma.conversion.checkpoint import return_freed_memory_to_the_system
from keras_t5gemma.conversion.config import backbone_from_hf_config
from keras_t5gemma.conversion.config import check_t5gemma2_config
from keras_t5gemma.conversion.image_processor import image_converter_kwargs_from_hf
from keras_t5gemma.conversion.quantized_loading import build_quantized
from keras_t5gemma.conversion.weights import CLASSIFIER_HEAD_KEY
from keras_t5gemma.conversion.weights import TensorReader
from keras_t5gemma.conversion.weights import load_classifier_head
from keras_t5gemma.conversion.weights import load_weights
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_classification import T5Gemma2Classifier
from keras_t5gemma.utils.keras_hub_compat import PresetLoader
from keras_t5gemma.utils.loading import LoadProgress
from keras_t5gemma.utils.loading import built_without_values
from keras_t5gemma.utils.loading import copies_in_parallel
from keras_t5gemma.utils.loading import initialize_unfilled
from keras_t5gemma.utils.loading import model_bytes
from keras_t5gemma.utils.preset_utils import RoutedOptionsLoader


class _LoadingReader(TensorReader):
    """A checkpoint as a load reads it: each whole read passed to its `ReadAhead`, every byte counted on the bar."""

    reads_parts = True

    def __init__(self, checkpoint, ahead, bar):
        super().__init__()
        self._checkpoint, self._ahead, self._bar = checkpoint, ahead, bar

    def read(self, key):
        self._ahead.passed(key)
        array = self._checkpoint.read(key)
        self._bar.advance(array.nbytes)
        return array

    def read_stacked(self, keys):
        for key in keys:
            self._ahead.passed(key)
        array = self._checkpoint.read_stacked(keys)
        if array is not None:
            for key in keys:  # one step per tensor for a `progress` callable
                self._bar.advance(self._checkpoint.nbytes(key))
        return array

    def read_part(self, key, index):
        array = self._checkpoint.read_part(key, index)
        self._bar.advance(array.nbytes)
        return array

    def shape(self, key):
        return self._checkpoint.shape(key)

    def plan(self, keys):
        self._ahead.plan(keys)


class T5Gemma2CheckpointLoader(RoutedOptionsLoader, PresetLoader):
    """Builds T5Gemma 2 models from a Hugging Face checkpoint.

    `load_backbone` takes every backbone option (`BACKBONE_OPTIONS`):
    `text_only` skips the vision tower and its weights, `encoder_only` the
    decoder, `quantize="int8"` builds the model of `quantize("int8")` with
    each tensor quantized as it is read (see `quantized_loading`).
    """

    def __init__(self, preset, config):
        super().__init__(preset, config)
        self.checkpoint = HFCheckpoint(preset, config, check_config=self.check_config)

    @staticmethod
    def check_config(config):
        check_t5gemma2_config(config)

    def check_backbone_class(self):
        return T5Gemma2Backbone

    def load_backbone(
        self,
        cls,
        load_weights_=True,
        text_only=False,
        encoder_only=False,
        progress=None,
        dtype=None,
        quantize=None,
        remat=False,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"Unexpected arguments for a T5Gemma 2 checkpoint: {sorted(kwargs)}.")

        def build(policy):
            return backbone_from_hf_config(
                self.config, text_only=text_only, encoder_only=encoder_only, dtype=policy, cls=cls, remat=remat
            )

        return self.build_and_fill(build, dtype, quantize, load_weights_, progress, load_weights)

    def build_and_fill(self, build, dtype, quantize, load_weights_, progress, load):
        """`build_quantized(build, ...)` with no initializer run, each variable filled from the checkpoint.

        `load(backbone, keys, reader)` assigns the weights
        (`weights.load_weights`) from a `_LoadingReader`: a variable laid out
        over devices gets only its devices' parts read, the tensors read whole
        are fetched from the disk ahead of their conversion (`ReadAhead`), a
        fused kernel's tensors stored back to back are read as one array, and
        the copies into JAX run in two threads (`copies_in_parallel`).
        `progress` is the backbone option (see `utils.loading.LoadProgress`).
        """
        if not load_weights_:
            return build_quantized(build, dtype, quantize)
        return_freed_memory_to_the_system()
        backbone = built_without_values(lambda: build_quantized(build, dtype, quantize))
        checkpoint = self.checkpoint
        keys = checkpoint.keys()
        bar = LoadProgress(sum(checkpoint.nbytes(key) for key in keys), f"`{self.preset}`", progress)
        with ReadAhead(checkpoint) as ahead, copies_in_parallel():
            load(backbone, keys, _LoadingReader(checkpoint, ahead, bar))
        initialize_unfilled(backbone)
        bar.done(model_bytes(backbone))
        return backbone

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        image_token_id = self.config.get("image_token_index", 256_001)
        return self.tokenizer_from_checkpoint(cls, image_placeholder=image_token_id, **kwargs)

    def tokenizer_from_checkpoint(self, cls, **kwargs):
        """`cls(proto=..., **kwargs)` from `tokenizer.model` or `tokenizer.json`; errors name the file."""
        # Imported here: the SentencePiece protobuf is needed only for checkpoints without `tokenizer.model`.
        from keras_t5gemma.conversion.vocabulary import proto_from_tokenizer_json

        if self.checkpoint.has("tokenizer.model"):
            source = "tokenizer.model"
            with open(self.checkpoint.path(source), "rb") as file:
                proto = file.read()
        elif self.checkpoint.has("tokenizer.json"):
            source = "tokenizer.json"
            proto = proto_from_tokenizer_json(self.checkpoint.json(source))
        else:
            raise FileNotFoundError(f"`{self.preset}` has neither `tokenizer.model` nor `tokenizer.json`.")
        try:
            return cls(proto=proto, **kwargs)
        except ValueError as error:
            raise ValueError(f"`{self.preset}/{source}`: {error}") from None

    def load_image_converter(self, cls, **kwargs):
        encoder = self.config.get("encoder", {})
        if encoder.get("vision_config") is None:
            return None
        for name in ("preprocessor_config.json", "processor_config.json"):
            if self.checkpoint.has(name):
                return cls(**image_converter_kwargs_from_hf(self.checkpoint.json(name)), **kwargs)
        size = encoder["vision_config"].get("image_size", 896)
        return cls(image_size=(size, size), **kwargs)

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        kwargs = cls._add_missing_kwargs(self, kwargs)
        encoder = self.config.get("encoder", {})
        kwargs.setdefault("mm_tokens_per_image", encoder.get("mm_tokens_per_image", 256))
        add_bos, add_eos = self._special_tokens_added()
        kwargs.setdefault("add_start_token", add_bos)
        kwargs.setdefault("add_end_token", add_eos)
        return cls(**kwargs)

    def _special_tokens_added(self):
        """Whether the reference tokenizer adds `<bos>`/`<eos>` to a single text.

        `transformers` 5.23 follows the post-processor of `tokenizer.json` when
        there is one, else `tokenizer_config.json`; Gemma's convention is
        `<bos>` only.
        """
        if self.checkpoint.has("tokenizer.json"):
            processor = self.checkpoint.json("tokenizer.json").get("post_processor") or {}
            if processor.get("type") == "TemplateProcessing":
                pieces = [item.get("SpecialToken", {}).get("id") for item in processor.get("single", [])]
                return "<bos>" in pieces[:1], "<eos>" in pieces[-1:]
        if self.checkpoint.has("tokenizer_config.json"):
            config = self.checkpoint.json("tokenizer_config.json")
            return bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
        return True, False

    def has_classifier_head(self):
        """Whether the checkpoint holds a classification head (`score.out_proj`)."""
        return f"{CLASSIFIER_HEAD_KEY}.weight" in set(self.checkpoint.keys())

    def classifier_kwargs(self, num_classes_given):
        """Classifier arguments from the config: ids, dropout, and (with a head) classes and names."""
        decoder = self.config.get("decoder", {})
        kwargs = {
            "start_token_id": decoder.get("bos_token_id", 2),
            "pad_token_id": self.config.get("pad_token_id", decoder.get("pad_token_id", 0)),
            "dropout": float(self.config.get("classifier_dropout_rate", 0.0)),
        }
        if self.has_classifier_head() and not num_classes_given:
            id2label = self.config.get("id2label") or {}
            kwargs["num_classes"] = len(id2label) or int(self.config.get("num_labels", 2))
            if id2label:
                kwargs["labels"] = [id2label[str(i)] for i in range(len(id2label))]
        return kwargs

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        if not issubclass(cls, T5Gemma2Classifier):
            return super().load_task(cls, load_weights, load_task_weights, **kwargs)
        kwargs = {**self.classifier_kwargs("num_classes" in kwargs), **kwargs}
        task = super().load_task(cls, load_weights, load_task_weights, **kwargs)
        if load_weights and load_task_weights and self.has_classifier_head():
            load_classifier_head(task, self.checkpoint.keys(), self.checkpoint.read)
        return task
