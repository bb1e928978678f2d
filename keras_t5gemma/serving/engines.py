"""The one interface the server drives: a Keras task or an ONNX export, stepped token by token.

An engine lays out one prompt (`prepare`), starts a padded batch of them
(`start`: encoder, cross keys/values, empty caches), runs one decoder token per
row (`step`), decodes token ids to text and embeds. The batcher owns the loop,
so both paths batch, stream and stop rows the same way.
"""

import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class Prompt:
    """One laid-out prompt: encoder ids `(S,)` (`<bos>` and image placeholders included) and its images."""

    token_ids: np.ndarray
    pixels: np.ndarray | None  # (N, H, W, 3) float32 converted images, or None

    @property
    def num_images(self):
        return 0 if self.pixels is None else len(self.pixels)


class PromptError(ValueError):
    """A prompt the model cannot take (too long, images that do not match its markers): a 400."""


class KerasEngine:
    """A `T5Gemma2Seq2SeqLM` (or `T5GemmaSeq2SeqLM`) preset, run through `DecoderSteps`.

    Args:
        preset: anything `from_preset` takes.
        embed_batch_sizes: batch-size buckets of `embed` (inputs are padded
            to one, so that the embedder compiles once per bucket).
    """

    kind = "keras"

    def __init__(self, preset, embed_batch_sizes=(1, 4, 16)):
        from keras_t5gemma.models.auto import load_seq_2_seq_lm
        from keras_t5gemma.models.streaming import DecoderSteps
        from keras_t5gemma.models.streaming import sentencepiece_decoder

        self.preset = preset
        self.seq_2_seq_lm = load_seq_2_seq_lm(preset)
        self.seq_2_seq_lm.compile(sampler="greedy")
        self.preprocessor = self.seq_2_seq_lm.preprocessor
        tokenizer = self.preprocessor.tokenizer
        self.bos_id = tokenizer.start_token_id
        self.eos_id = tokenizer.end_token_id
        self.special_ids = tuple(tokenizer.special_token_ids)
        self.decode = sentencepiece_decoder(tokenizer)
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
        self.vision = getattr(self.preprocessor, "image_converter", None) is not None
        self.image_shape = tuple(self.preprocessor.image_converter.image_size) + (3,) if self.vision else None
        self.tokens_per_image = getattr(self.preprocessor, "mm_tokens_per_image", 0)
        self.max_decode_length = None  # any cache length
        self.max_prompt_length = None
        self._steps = DecoderSteps(self.seq_2_seq_lm)
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self.embed_batch_sizes = sorted(embed_batch_sizes)

    def _fast_token_ids(self, text):
        """A text-only prompt's ids from SentencePiece directly (the preprocessor's layout, without TF's
        per-call overhead), or None where only the preprocessor knows the layout (image markers)."""
        preprocessor = self.preprocessor
        tokenizer = preprocessor.tokenizer
        if not hasattr(preprocessor, "add_start_token") or not hasattr(tokenizer, "start_of_image_token"):
            return None
        if any(piece in text for piece in (tokenizer.start_of_image_token, tokenizer.image_placeholder_token)):
            return None
        ids = self._processor.encode(text)
        return [self.bos_id] * preprocessor.add_start_token + ids + [self.eos_id] * preprocessor.add_end_token

    def prepare(self, text, images, max_prompt_tokens):
        """Lays out one prompt as `generate` does; images are uint8 `(H, W, 3)` arrays, one per marker."""
        if not images:
            ids = self._fast_token_ids(text)
            if ids is not None:
                if len(ids) > max_prompt_tokens:
                    limit = max_prompt_tokens
                    raise PromptError(f"the prompt has {len(ids)} tokens; this server takes at most {limit}")
                return Prompt(np.asarray(ids, "int32"), None)
        inputs = {"encoder_text": [text]}
        if images:
            if not self.vision:
                raise PromptError("this model has no vision tower; it cannot take images")
            inputs["images"] = [list(images)]
        try:
            prepared = self.preprocessor.generate_preprocess(
                inputs, encoder_sequence_length=max_prompt_tokens, decoder_sequence_length=2
            )
        except ValueError as error:
            raise PromptError(_one_line(error)) from None
        length = int(np.asarray(prepared["encoder_padding_mask"]).sum())
        token_ids = np.asarray(prepared["encoder_token_ids"])[0, :length].astype("int32")
        pixels = None
        if images:
            pixels = np.asarray(prepared["images"], "float32")[0, : len(images)]
        return Prompt(token_ids, pixels)

    def start(self, token_ids, padding_mask, pixels, max_length):
        inputs = {"encoder_token_ids": token_ids, "encoder_padding_mask": padding_mask}
        if self.vision:
            inputs["images"] = pixels
        return self._steps.start(inputs, max_length)

    def step(self, token_ids, cache, position):
        return self._steps.step(token_ids, cache, position)

    def embed(self, samples):
        """Vectors `(B, hidden)` for samples `(text or None, [images])`, as `T5Gemma2Embedder.predict`."""
        from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder

        inputs = [text if not images else {"text": text, "images": images} for text, images in samples]
        largest = self.embed_batch_sizes[-1]
        vectors = []
        with self._embedder_lock:
            if self._embedder is None:
                # The loaded backbone's weights, not a second copy.
                self._embedder = T5Gemma2Embedder.from_preset(self.preset, backbone=self.seq_2_seq_lm.backbone)
            for start in range(0, len(inputs), largest):
                chunk = inputs[start : start + largest]
                size = next(size for size in self.embed_batch_sizes if size >= len(chunk))
                padded = chunk + [chunk[-1]] * (size - len(chunk))
                vectors.append(np.asarray(self._embedder.predict(padded, batch_size=size, verbose=0))[: len(chunk)])
        return np.concatenate(vectors).astype("float32")

    def warm_up_embeddings(self):
        """Embeds once per batch bucket (text inputs), so that no request compiles the embedder."""
        for size in self.embed_batch_sizes:
            self.embed([("warm up", [])] * size)

    @property
    def embed_max_prompt_tokens(self):
        with self._embedder_lock:
            if self._embedder is None:
                return self.preprocessor.encoder_sequence_length
            return self._embedder.preprocessor.sequence_length


class OnnxEngine:
    """A folder written by `keras-t5gemma export --format onnx`, run with `t5gemma_onnx` (no Keras in the loop).

    Its cache length is fixed at export: `max_tokens` is at most
    `max_decode_length - 1`.
    """

    kind = "onnx"

    def __init__(self, folder, threads=None, precision=None):
        from t5gemma_onnx import OnnxSeq2SeqLM

        self.preset = str(folder)
        # precision: the export's graph set (fp32, fp16, int8, q4, q4f16); None for the export's default.
        self.model = OnnxSeq2SeqLM(folder, threads=threads, precision=precision)
        if self.model.tokenizer is None:
            raise ValueError(f"the export {folder} has no tokenizer; the server needs one")
        settings = self.model.settings
        special = self.model.special_token_ids
        self.bos_id, self.eos_id = special["bos"], special["eos"]
        self.special_ids = tuple(special.values())
        self.decode = self.model.tokenizer.decode
        self.vision = bool(settings["vision"])
        self.image_shape = (settings["image_size"], settings["image_size"], 3) if self.vision else None
        self.tokens_per_image = settings.get("mm_tokens_per_image", 0)
        self.max_decode_length = self.model.max_decode_length
        self.max_prompt_length = settings["prompt"]["encoder_sequence_length"]
        self._lock = threading.Lock()

    def prepare(self, text, images, max_prompt_tokens):
        from t5gemma_onnx.runtime import convert_image

        if images and not self.vision:
            raise PromptError("this model has no vision tower; it cannot take images")
        try:
            token_ids, padding_mask, _ = self.model.encoder_inputs([text], [list(images)] if images else None)
        except ValueError as error:
            raise PromptError(str(error)) from None
        length = int(padding_mask.sum())
        if length > max_prompt_tokens:
            raise PromptError(f"the prompt has {length} tokens; this server takes at most {max_prompt_tokens}")
        pixels = None
        if images:
            pixels = np.stack([convert_image(image, self.model.settings["image_converter"]) for image in images])
        return Prompt(token_ids[0, :length].astype("int32"), pixels)

    def start(self, token_ids, padding_mask, pixels, max_length):
        model = self.model
        encoder = model._session("encoder")
        feeds = model._encoder_feeds(token_ids, padding_mask, pixels if self.vision else None)
        names = [output.name for output in encoder.get_outputs()]
        encoded = dict(zip(names, encoder.run(None, feeds)))
        settings = model.settings
        shape = (len(token_ids), model.max_decode_length, settings["num_key_value_heads"], settings["head_dim"])
        cache = {"encoder_padding_mask": feeds["encoder_padding_mask"]}
        for layer in range(model.num_layers):
            cache[f"past_key_{layer}"] = np.zeros(shape, np.float32)
            cache[f"past_value_{layer}"] = np.zeros(shape, np.float32)
            cache[f"cross_key_{layer}"] = encoded[f"cross_key_{layer}"]
            cache[f"cross_value_{layer}"] = encoded[f"cross_value_{layer}"]
        return cache

    def step(self, token_ids, cache, position):
        decoder = self.model._session("decoder")
        names = [output.name for output in decoder.get_outputs()]
        cache["decoder_token_ids"] = np.asarray(token_ids, np.int64)
        cache["cache_position"] = np.array([position], np.int64)
        outputs = dict(zip(names, decoder.run(names, cache)))
        for layer in range(self.model.num_layers):
            cache[f"past_key_{layer}"] = outputs[f"present_key_{layer}"]
            cache[f"past_value_{layer}"] = outputs[f"present_value_{layer}"]
        logits = outputs["logits"][:, -1]
        return logits, logits.argmax(axis=-1), cache

    def embed(self, samples):
        inputs = [text if not images else {"text": text, "images": images} for text, images in samples]
        with self._lock:
            return np.asarray(self.model.embed(inputs), "float32")

    @property
    def embed_max_prompt_tokens(self):
        return self.max_prompt_length


def _one_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        return lines[1]
    return " ".join(lines)
