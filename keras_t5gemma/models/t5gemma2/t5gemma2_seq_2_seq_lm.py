"""T5Gemma 2 sequence-to-sequence language model: `generate` and `fit`."""

import os
import re
import warnings

import keras
import numpy as np
from keras import ops
from keras_hub.models import Seq2SeqLM

from keras_t5gemma.models.chunked_loss import ChunkedLossMixin
from keras_t5gemma.models.encoder_decoder_backbone import SEGMENT_INPUTS
from keras_t5gemma.models.encoder_decoder_backbone import check_token_ids
from keras_t5gemma.models.samplers import ArgmaxSampler
from keras_t5gemma.models.streaming import stream_generate
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import T5Gemma2Seq2SeqLMPreprocessor
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm_preprocessor import TruncationWarning
from keras_t5gemma.models.task import T5Gemma2Task
from keras_t5gemma.utils.keras_hub_compat import any_equal
from keras_t5gemma.utils.preset_utils import get_exporter


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2Seq2SeqLM(ChunkedLossMixin, T5Gemma2Task, Seq2SeqLM):
    """T5Gemma 2 with a language-modelling head, for generation and fine-tuning.

    `fit` trains on `(x, y, sample_weight)` from the preprocessor: `x` holds the
    encoder and decoder inputs (and `images` for a vision model), `y` the next
    decoder tokens. `generate` runs the encoder and computes the decoder's
    cross keys/values once per call, then samples one token per step with a
    self-attention cache; the step is compiled once per input shape.

    Args:
        backbone: a `T5Gemma2Backbone`.
        preprocessor: a `T5Gemma2Seq2SeqLMPreprocessor` or `None` (then inputs
            are token-id dicts as the backbone takes them).

    Example:
    ```python
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.generate("reverse: 1 2 3", max_length=16)

    seq_2_seq_lm.compile(sampler="greedy")
    seq_2_seq_lm.fit(x={"encoder_text": ["a"], "decoder_text": ["b"]}, batch_size=1)
    ```
    """

    backbone_cls = T5Gemma2Backbone
    preprocessor_cls = T5Gemma2Seq2SeqLMPreprocessor
    # The decoder positions the model was made for (`max_position_embeddings` of the released configs).
    max_decoder_positions = 131_072

    def __init__(self, backbone, preprocessor=None, train_vision_tower=False, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        # The preprocessor's inputs (as KerasHub's tasks take them); packed
        # rows' segment ids go to the backbone in `call`.
        inputs = {name: value for name, value in backbone.input.items() if name not in SEGMENT_INPUTS}
        hidden = backbone(inputs)["decoder_sequence_output"]
        logits = backbone.token_embedding.logits(hidden)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

        # === Config ===
        self.train_vision_tower = train_vision_tower

    def get_config(self):
        return {**super().get_config(), "train_vision_tower": self.train_vision_tower}

    def call(self, inputs, training=None, mask=None):
        """Logits `(B, T, V)`: the backbone's decoder states times the tied table, packed rows or not.

        One route for every input: the functional graph above holds only the
        preprocessor's inputs (KerasHub's `run_task_test` compares the two
        structures), so running it would drop packed rows' segment ids; the
        backbone takes them (`None` or absent: one example per row).
        """
        hidden = self.backbone(inputs, training=training)["decoder_sequence_output"]
        return self.backbone.token_embedding.logits(hidden)

    def compile(self, *args, sampler="top_k", **kwargs):
        """KerasHub's `compile`; `sampler="greedy"` takes the argmax of the logits (`ArgmaxSampler`)."""
        super().compile(*args, sampler=ArgmaxSampler() if sampler == "greedy" else sampler, **kwargs)

    def get_compile_config(self):
        """Keras' compile config, with the sampler, so that a `.keras` file restores both."""
        config = super().get_compile_config()
        if config is not None:
            config["sampler"] = keras.saving.serialize_keras_object(self.sampler)
        return config

    def compile_from_config(self, config):
        """Compiles as `get_compile_config` recorded (`keras.saving.load_model` calls this)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            # The saved optimizer variables are loaded into these next.
            self.optimizer.build(self.trainable_variables)

    def predict(self, x=None, *args, **kwargs):
        """Keras `predict`; token-id inputs (no preprocessor) are checked first, see `check_token_ids`."""
        if self.preprocessor is None and isinstance(x, dict):
            check_token_ids(x, self.backbone.vocabulary_size)
        return super().predict(x, *args, **kwargs)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`T5Gemma2Task.fit`; warns once (`TruncationWarning`) when in-memory texts are cut to the sequence lengths.

        Texts in a dataset are not counted (they would have to be read twice).
        """
        texts = _training_texts(x, y) if self.preprocessor is not None else None
        if texts is not None:
            report = self.preprocessor.truncation(*texts)
            if report:
                warnings.warn(report.message(), TruncationWarning, stacklevel=2)
        return super().fit(x, y, *args, **kwargs)

    # === Generation ===

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """KerasHub's `generate`, after checking that `max_length` fits the model and the memory.

        Raises:
            ValueError: `max_length` beyond the decoder's positions
                (`max_decoder_positions`), or a self-attention cache larger
                than the memory available.
        """
        self.check_max_length(max_length, inputs)
        return super().generate(inputs, max_length=max_length, stop_token_ids=stop_token_ids, strip_prompt=strip_prompt)

    def check_max_length(self, max_length=None, inputs=None):
        """Refuses a decoder length the model or the machine cannot hold, before anything is allocated.

        The length is `max_length`, else the preprocessor's
        `decoder_sequence_length`, else the width of token-id inputs'
        `decoder_token_ids`. Its cache (keys and values of every decoder
        layer, for the batch of `inputs`) is compared with the memory
        available to the first device (free host memory on a CPU).

        Raises:
            ValueError: naming the length, the limit and what to do.
        """
        batch = _batch_size(inputs)
        if max_length is None:
            if self.preprocessor is not None:
                max_length = self.preprocessor.decoder_sequence_length
            elif isinstance(inputs, dict) and "decoder_token_ids" in inputs:
                max_length = np.shape(inputs["decoder_token_ids"])[-1]
            else:
                return
        if max_length > self.max_decoder_positions:
            raise ValueError(
                f"`max_length` {max_length:,} is beyond the decoder's {self.max_decoder_positions:,} positions "
                "(the model's `max_position_embeddings`); give at most that."
            )
        sizes = self.backbone.decoder.layer_kwargs
        layers = len(self.backbone.decoder.transformer_layers)
        itemsize = int(re.search(r"\d+", keras.backend.standardize_dtype(self.compute_dtype)).group()) // 8
        cache = 2 * layers * batch * max_length * sizes["num_key_value_heads"] * sizes["head_dim"] * itemsize
        available = available_memory_bytes()
        if available is not None and cache > available:
            raise ValueError(
                f"`max_length` {max_length:,} needs a {cache / 2**30:.1f} GiB decoder cache for {batch} prompt(s), "
                f"more than the {available / 2**30:.1f} GiB of memory available; give a smaller `max_length` "
                "(or fewer prompts per batch)."
            )

    def stream_generate(self, inputs, max_length=None, sampler=None, stop_token_ids="auto"):
        """Generates for one prompt, yielding text pieces as tokens are chosen (`models.streaming`).

        The pieces joined are what `generate(inputs, max_length)` returns with
        the same sampler (greedy: the same tokens exactly).

        Example:
        ```python
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
        "".join(seq_2_seq_lm.stream_generate("reverse: 1 2 3", max_length=16, sampler="greedy"))  # '3 2 1'
        ```
        """
        self.check_max_length(max_length, inputs)
        return stream_generate(self, inputs, max_length=max_length, sampler=sampler, stop_token_ids=stop_token_ids)

    def make_generate_function(self):
        """KerasHub's compiled generate function, behind a host-side check of each batch's token ids.

        The check costs a pass over `(B, S)` ints per `generate` call, outside
        the compiled step.
        """
        generate_function = super().make_generate_function()
        vocabulary_size = self.backbone.vocabulary_size

        def checked_generate_function(inputs, stop_token_ids=None):
            check_token_ids(inputs, vocabulary_size)
            return generate_function(inputs, stop_token_ids=stop_token_ids)

        return checked_generate_function

    def export_to_keras_hub(self, path, overwrite=False):
        """Writes a KerasHub 0.32 preset folder that `keras_hub.models.T5Gemma2Seq2SeqLM.from_preset` loads.

        The backbone, and KerasHub's preprocessor and tokenizer built from
        this one's (vocabulary, sequence lengths, start/end tokens). See
        `conversion/keras_hub_export.py` for what is refused.

        KerasHub's T5Gemma 2 holds no vision tower here: export a text-only
        model (a Hugging Face checkpoint loaded with `text_only=True`, or one
        built without a `vision_encoder`, as below).

        Example:
        ```python
        import tempfile

        backbone = T5Gemma2Backbone(
            vocabulary_size=300,
            encoder_hidden_dim=32, encoder_intermediate_dim=64, encoder_num_layers=2,
            encoder_num_attention_heads=2, encoder_num_key_value_heads=1, encoder_head_dim=16,
            decoder_hidden_dim=32, decoder_intermediate_dim=64, decoder_num_layers=2,
            decoder_num_attention_heads=2, decoder_num_key_value_heads=1, decoder_head_dim=16,
            sliding_window=4, eoi_token_index=298, image_token_index=299,
        )
        folder = T5Gemma2Seq2SeqLM(backbone).export_to_keras_hub(tempfile.mkdtemp() + "/tiny")
        # keras_hub.models.T5Gemma2Seq2SeqLM.from_preset(folder)
        ```
        """
        return get_exporter("keras-hub")(self, path, overwrite=overwrite)

    # === KerasHub's encoder and cached-decoder calls ===

    def call_encoder(self, token_ids, padding_mask, images=None, vision_indices=None):
        """Runs the encoder, as KerasHub's `T5Gemma2Seq2SeqLM.call_encoder` does.

        Args:
            token_ids: int `(B, S)`.
            padding_mask: `(B, S)`, 1 for real tokens.
            images: optional float `(B, N, H, W, 3)` for a vision model; the
                image placeholders (`image_token_index`) mark where they go.
            vision_indices: must be None. KerasHub passes the placeholders'
                positions here; this model finds them from the token ids.

        Returns:
            `(encoder_output (B, S, encoder_hidden_dim), padding_mask)`.
        """
        if vision_indices is not None:
            raise ValueError(
                "`vision_indices` is not used here: the image placeholder tokens "
                f"(id {self.backbone.image_token_index}) in `token_ids` mark where each image goes. Pass None."
            )
        return self.backbone.encode(token_ids, padding_mask, images), padding_mask

    def call_decoder_with_cache(
        self,
        decoder_token_ids,
        decoder_padding_mask,
        cache,
        cache_update_index,
        encoder_output,
        encoder_padding_mask,
    ):
        """One cached decoder pass in KerasHub's cache layout.

        Args:
            decoder_token_ids: int `(B, T)`, at positions `cache_update_index + t`.
            decoder_padding_mask: `(B, T)`; the causal mask over the cache
                decides what each position sees, as in `generate`.
            cache: `(self_cache, cross_cache)`: `self_cache` float
                `(B, decoder_num_layers, 2, T_max, K, H)` (keys, values);
                `cross_cache` the same over the encoder length, or None to
                project `encoder_output` now.
            cache_update_index: int or int tensor.
            encoder_output: `(B, S, encoder_hidden_dim)`.
            encoder_padding_mask: `(B, S)`.

        Returns:
            `(logits (B, T, V), hidden (B, T, D), (self_cache, cross_cache))`.
        """
        del decoder_padding_mask
        self_cache, cross_cache = cache
        layers = range(len(self.backbone.decoder.transformer_layers))
        if cross_cache is None:
            cross_key_values = self.backbone.decoder.cross_key_values(encoder_output)
        else:
            cross_key_values = [(cross_cache[:, i, 0], cross_cache[:, i, 1]) for i in layers]
        self_caches = [(self_cache[:, i, 0], self_cache[:, i, 1]) for i in layers]
        hidden, (self_caches, cross_key_values, _) = self._decoder_step(
            decoder_token_ids, (self_caches, cross_key_values, encoder_padding_mask), cache_update_index
        )
        logits = self.backbone.token_embedding.logits(hidden)

        def stacked(pairs):
            # [(B, L, K, H) x 2] per layer -> (B, layers, 2, L, K, H)
            return ops.stack([ops.stack(pair, axis=1) for pair in pairs], axis=1)

        return logits, hidden, (stacked(self_caches), stacked(cross_key_values))

    def _build_cache(
        self,
        encoder_token_ids,
        encoder_padding_mask,
        decoder_token_ids,
        decoder_padding_mask,
        images=None,
        vision_indices=None,
    ):
        """KerasHub's cache: the decoder prompt run into empty caches of its length.

        Returns:
            `(hidden (B, T, D), (self_cache, cross_cache), (encoder_output, encoder_padding_mask))`
            in the layout of `call_decoder_with_cache`.
        """
        encoder_output, encoder_padding_mask = self.call_encoder(
            encoder_token_ids, encoder_padding_mask, images=images, vision_indices=vision_indices
        )
        decoder = self.backbone.decoder
        sizes = decoder.layer_kwargs
        shape = (
            ops.shape(decoder_token_ids)[0],
            len(decoder.transformer_layers),
            2,
            ops.shape(decoder_token_ids)[1],
            sizes["num_key_value_heads"],
            sizes["head_dim"],
        )
        _, hidden, cache = self.call_decoder_with_cache(
            decoder_token_ids,
            decoder_padding_mask,
            (ops.zeros(shape, self.compute_dtype), None),
            0,
            encoder_output,
            encoder_padding_mask,
        )
        return hidden, cache, (encoder_output, encoder_padding_mask)

    def _decoder_step(self, token_ids, cache, cache_update_index):
        """Runs `token_ids` `(B, T)` at positions `cache_update_index + t` against the cache.

        `cache` is `(self_caches, cross_key_values, encoder_padding_mask)`; only
        the self-attention caches change.
        """
        self_caches, cross_key_values, encoder_padding_mask = cache
        embeddings = self.backbone.token_embedding(token_ids)
        hidden, self_caches = self.backbone.decoder.call_with_cache(
            embeddings, cache_update_index, self_caches, cross_key_values, encoder_padding_mask
        )
        return hidden, (self_caches, cross_key_values, encoder_padding_mask)

    def _initial_cache(self, inputs, max_length):
        """Encodes once and computes every decoder layer's cross keys/values once."""
        backbone = self.backbone
        encoder_padding_mask = inputs["encoder_padding_mask"]
        encoder_output = backbone.encode(inputs["encoder_token_ids"], encoder_padding_mask, inputs.get("images"))
        cross_key_values = backbone.decoder.cross_key_values(encoder_output)
        batch = ops.shape(encoder_output)[0]
        # The decoder's sizes (T5Gemma's may differ from its encoder's).
        sizes = backbone.decoder.layer_kwargs
        shape = (batch, max_length, sizes["num_key_value_heads"], sizes["head_dim"])
        self_caches = [
            (ops.zeros(shape, self.compute_dtype), ops.zeros(shape, self.compute_dtype))
            for _ in backbone.decoder.transformer_layers
        ]
        return self_caches, cross_key_values, encoder_padding_mask

    def generate_step(self, inputs, stop_token_ids=None):
        """Generates one batch of decoder tokens.

        Args:
            inputs: dict with `encoder_token_ids`, `encoder_padding_mask`,
                `decoder_token_ids` and `decoder_padding_mask` (the decoder
                prompt, right-padded to the output length), and `images` for
                a vision model.
            stop_token_ids: tuple of ids that end a sequence, or `None`.

        Returns:
            dict with `decoder_token_ids` and `decoder_padding_mask`, where
            positions after a stop token are masked.
        """
        token_ids = inputs["decoder_token_ids"]
        padding_mask = inputs["decoder_padding_mask"]
        max_length = ops.shape(token_ids)[1]
        cache = self._initial_cache(inputs, max_length)
        # The first sampled position; shorter prompts in a ragged batch keep
        # their own tokens until the sampler reaches their end.
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

        # Prompt positions before `index - 1` are cached in one pass; the loop
        # (re)computes from `index - 1` on. A prompt of one token needs none.
        cache = ops.cond(
            index > 1,
            lambda: self._decoder_step(token_ids, cache, 0)[1],
            lambda: cache,
        )

        def next(prompt, cache, index):
            token = ops.slice(prompt, (0, index - 1), (ops.shape(prompt)[0], 1))
            hidden, cache = self._decoder_step(token, cache, index - 1)
            logits = self.backbone.token_embedding.logits(hidden[:, 0, :])
            return logits, hidden, cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            model=self,
        )

        if stop_token_ids is None:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        else:
            # Keep everything up to and including the first stop token.
            is_stop = ops.cast(any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask)), "int32")
            stops_before = ops.cumsum(is_stop, axis=-1) - is_stop
            padding_mask = ops.equal(stops_before, 0)
        outputs = {"decoder_token_ids": token_ids, "decoder_padding_mask": padding_mask}
        distribution = keras.distribution.distribution()
        if distribution is not None and distribution.num_processes > 1:
            # Each process of a multi-host job reads the whole answer batch,
            # not only the rows its devices hold (a gather of token ids).
            replicated = keras.distribution.TensorLayout((None, None), distribution.device_mesh)
            outputs = {key: keras.distribution.distribute_tensor(value, replicated) for key, value in outputs.items()}
        return outputs


def available_memory_bytes():
    """Bytes free on the first accelerator (JAX's memory stats), else the host's available memory, else None."""
    if keras.backend.backend() == "jax":
        import jax

        # This process' own device: in a multi-process job `jax.devices()[0]` is process 0's, which others cannot query.
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _batch_size(inputs):
    """Prompts in one `generate` call: a string or a dict of one prompt is 1; a dataset's is unknown (1)."""
    if isinstance(inputs, dict):
        for key in ("encoder_text", "encoder_token_ids"):
            if key in inputs:
                value = inputs[key]
                if isinstance(value, str):
                    return 1
                shape = np.shape(value) if not isinstance(value, (list, tuple)) else (len(value),)
                return int(shape[0]) if len(shape) > (1 if key == "encoder_token_ids" else 0) else 1
        return 1
    if isinstance(inputs, (list, tuple)):
        return max(1, len(inputs))
    if isinstance(inputs, np.ndarray) and inputs.ndim:
        return int(inputs.shape[0])
    return 1


def _training_texts(x, y):
    """`(encoder texts, decoder texts)` of in-memory training samples, or None (datasets, token ids)."""
    if isinstance(x, dict):
        encoder, decoder = x.get("encoder_text"), x.get("decoder_text", y)
    else:
        encoder, decoder = x, y
    for texts in (encoder, decoder):
        if isinstance(texts, np.ndarray) and texts.dtype.kind in "USO":
            continue
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            return None
    return list(encoder), list(decoder)
