"""Generation and embeddings from a T5Gemma ONNX export (either family), without Keras.

Reads a folder written by `keras_t5gemma.export.export_onnx` and needs only
numpy, onnxruntime and sentencepiece (and Pillow for images). It lays out
prompts as `T5Gemma2Seq2SeqLMPreprocessor` (`T5GemmaSeq2SeqLMPreprocessor`)
does, and generates as `T5Gemma2Seq2SeqLM.generate` does: the encoder graph
runs once and gives the decoder's cross keys/values, the decoder prompt is
prefilled as one chunk, then the decoder graph runs one token per step against
the static cache.

Both families' exports run here alike: their differences (separate or merged
cross-attention, soft caps, widths) live in the graphs, and what the runtime
needs of them in the settings (`family`; `prompt.image_markers`, whether a
`<start_of_image>` in a prompt is an image's place or plain text; the
widths).

Example:
```python
from t5gemma_onnx import OnnxSeq2SeqLM

model = OnnxSeq2SeqLM("digits_onnx")
model.generate(["reverse: 1 2 3", "sort: 3 1 2"], max_length=16)
model.embed(["sort: 1 2", "sort: 2 1"])  # (2, hidden_dim)
```

A folder may hold several precisions (`fp32`, `fp16`, `int8`, `q4`,
`q4f16`); `OnnxSeq2SeqLM(folder, precision="q4")` picks one, and
`available_precisions(folder)` lists them.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime

CONFIG_FILE = "t5gemma2_onnx.json"
SAMPLERS = ("greedy", "top_k", "top_p", "random")
START_OF_IMAGE_PIECE = "<start_of_image>"
# What the reference processor puts around each image, as the Keras preprocessor does.
IMAGE_BLOCK = f"\n\n{START_OF_IMAGE_PIECE}<end_of_image>\n\n"
# The floor of the norm in L2 normalisation, as the Keras embedder's.
NORM_EPSILON = 1e-12
PRECISIONS = ("fp32", "fp16", "int8", "q4", "q4f16")
_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _read_settings(folder):
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a T5Gemma ONNX export (either family): it has no {CONFIG_FILE}.")
    return json.loads(config_path.read_text())


def _graph_sets(settings):
    """`{precision: {"files": ...}}`; a version 1 folder (one set) is fp32 or int8 by its `quantization`."""
    if "precisions" in settings:
        return settings["precisions"]
    precision = settings.get("quantization") or "fp32"
    return {precision: {"files": {name: settings["files"][name] for name in ("encoder", "decoder", "embedder")}}}


def available_precisions(folder):
    """The precisions an export folder holds, in the order they were exported."""
    return list(_graph_sets(_read_settings(folder)))


def default_precision(settings):
    """fp32 if the export has it, else the first precision exported (the export's `default_precision`)."""
    sets = _graph_sets(settings)
    return settings.get("default_precision") or ("fp32" if "fp32" in sets else next(iter(sets)))


def _softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def sample(logits, sampler="greedy", rng=None, k=5, p=0.1, temperature=1.0):
    """Next tokens `(B,)` from logits `(B, V)`, as KerasHub's samplers pick them.

    `greedy` takes the argmax; `top_k` samples among the `k` largest; `top_p`
    among the smallest set of tokens whose probability reaches `p`; `random`
    from the whole softmax. `temperature` divides the logits first.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"`sampler` must be one of {SAMPLERS}; got {sampler!r}.")
    logits = np.asarray(logits, dtype=np.float64)
    if sampler == "greedy":
        return logits.argmax(axis=-1)
    rng = rng if rng is not None else np.random.default_rng()
    probabilities = _softmax(logits / temperature)
    order = np.argsort(-probabilities, axis=-1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, axis=-1)
    if sampler == "top_k":
        ranked[:, k:] = 0.0
    elif sampler == "top_p":
        before = np.cumsum(ranked, axis=-1) - ranked
        ranked = np.where(before < p, ranked, 0.0)
    ranked = ranked / ranked.sum(axis=-1, keepdims=True)
    picks = np.array([rng.choice(ranked.shape[1], p=row) for row in ranked])
    return np.take_along_axis(order, picks[:, None], axis=-1)[:, 0]


def convert_image(image, settings):
    """One image to float32 `(H, W, 3)` model input, as `T5Gemma2ImageConverter` converts it.

    Takes a PIL image (any mode; transparency composited onto white) or a
    uint8 / integer `(H, W, 3)` array with values in [0, 255]. Resizes with
    Pillow's bilinear filter (aspect ratio not kept), then `pixel * scale +
    offset`.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        pixels = np.asarray(image.convert("RGB"))
    else:
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"An image must be a `(height, width, 3)` RGB array; got shape {pixels.shape}.")
        if not np.issubdtype(pixels.dtype, np.integer):
            raise ValueError(
                f"Image arrays must hold uint8 (or integer) pixels in [0, 255]; got dtype {pixels.dtype}. "
                "Pass uint8 arrays or PIL images."
            )
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise ValueError(f"Image pixels must be in [0, 255]; got [{pixels.min()}, {pixels.max()}].")
        pixels = pixels.astype(np.uint8)
    height, width = settings["image_size"]
    if pixels.shape[:2] != (height, width):
        resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
    values = pixels.astype(np.float64)
    if settings["scale"] is not None:
        values = values * np.asarray(settings["scale"], dtype=np.float64)
    if settings["offset"] is not None:
        values = values + np.asarray(settings["offset"], dtype=np.float64)
    return values.astype(np.float32)


class OnnxSeq2SeqLM:
    """T5Gemma 2 or T5Gemma generation and embeddings from an ONNX export folder.

    Args:
        folder: a folder written by `keras_t5gemma.export.export_onnx`.
        providers: onnxruntime execution providers (default CPU).
        threads: optional int, onnxruntime intra-op threads.
        precision: which graph set to run (`"fp32"`, `"fp16"`, `"int8"`,
            `"q4"`, `"q4f16"`); default fp32 when the folder has it, else
            the first precision exported. fp32 is exact; `q4` is the
            smallest and, with int8, the fastest on CPU; `fp16`/`q4f16`
            are for accelerators (float16 matmuls are slow on x86 CPUs).

    Attributes:
        settings: the export's `t5gemma2_onnx.json`.
        family: `"t5gemma2"` or `"t5gemma"` (the first family).
        precision: the graph set in use.
        max_decode_length: the static cache length: the longest decoder
            sequence (`<bos>` + generated tokens).
    """

    def __init__(self, folder, providers=None, threads=None, precision=None):
        self.folder = Path(folder)
        self.settings = _read_settings(self.folder)
        sets = _graph_sets(self.settings)
        self.precision = precision or default_precision(self.settings)
        if self.precision not in sets:
            raise ValueError(
                f"The export {self.folder} has no {self.precision!r} graphs; it holds {', '.join(sets)} "
                "(export again with `--precision` naming it)."
            )
        self._files = sets[self.precision]["files"]
        # Exports written before the first family had one are T5Gemma 2's.
        self.family = self.settings.get("family", "t5gemma2")
        self.max_decode_length = self.settings["max_decode_length"]
        self.num_layers = self.settings["num_decoder_layers"]
        self._providers = providers or ["CPUExecutionProvider"]
        self._options = onnxruntime.SessionOptions()
        if threads:
            self._options.intra_op_num_threads = threads
        self._sessions = {}
        self.tokenizer = None
        if self.settings.get("tokenizer") is not None:
            import sentencepiece

            self.tokenizer = sentencepiece.SentencePieceProcessor(
                model_file=str(self.folder / self.settings["files"]["tokenizer"])
            )
            self.special_token_ids = self.settings["tokenizer"]["special_token_ids"]

    def _session(self, name):
        if name not in self._sessions:
            path = self.folder / self._files[name]
            self._sessions[name] = onnxruntime.InferenceSession(str(path), self._options, providers=self._providers)
        return self._sessions[name]

    # === Prompts ===

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("This export has no tokenizer (it was exported without a preprocessor); pass token ids.")

    def _image_markers(self):
        """Whether a `<start_of_image>` in a prompt marks an image (T5Gemma 2) or is plain text (the first family)."""
        return self.settings["prompt"].get("image_markers", True)

    def _prompt_ids(self, prompt):
        """A prompt's ids: `<bos>` + tokens, each image marker expanded to its placeholder block."""
        if self._image_markers():
            prompt = prompt.replace(START_OF_IMAGE_PIECE, IMAGE_BLOCK)
        ids = self.tokenizer.encode(prompt)
        special = self.special_token_ids
        if self.settings["vision"]:
            expanded = []
            for token in ids:
                expanded.append(token)
                if token == special["start_of_image"]:
                    expanded += [special["image_placeholder"]] * self.settings["mm_tokens_per_image"]
            ids = expanded
        prompt_settings = self.settings["prompt"]
        return (
            [special["bos"]] * prompt_settings["add_start_token"]
            + ids
            + [special["eos"]] * prompt_settings["add_end_token"]
        )

    def _images(self, images, counts):
        """Per-prompt image lists to `(B, N, H, W, 3)` pixel values; checks them against the markers."""
        size = self.settings["image_size"]
        if images is None:
            images = [[] for _ in counts]
        if len(images) != len(counts):
            raise ValueError(f"Got {len(counts)} prompts but {len(images)} image entries.")
        samples = []
        for index, (sample, count) in enumerate(zip(images, counts)):
            if sample is None:
                sample = []
            elif not isinstance(sample, (list, tuple)):
                sample = [sample]
            if len(sample) != count:
                raise ValueError(
                    f"Prompt {index} has {count} {START_OF_IMAGE_PIECE} marker(s) but {len(sample)} image(s) "
                    "were given; each image needs one marker."
                )
            samples.append(sample)
        if not self.settings["vision"]:
            if any(samples):
                raise ValueError("Images were given but this export is text-only.")
            return None
        slots = max((len(sample) for sample in samples), default=0)
        pixels = np.zeros((len(samples), slots, size, size, 3), np.float32)
        for row, sample in enumerate(samples):
            for column, image in enumerate(sample):
                pixels[row, column] = convert_image(image, self.settings["image_converter"])
        return pixels

    def encoder_inputs(self, prompts, images=None, truncate=False):
        """Prompts (and per-prompt image lists) to right-padded encoder inputs.

        Returns `(token_ids int64 (B, S), padding_mask int64 (B, S),
        pixel_values (B, N, H, W, 3) or None)`.

        Raises:
            ValueError: if a prompt is longer than the export's encoder
                sequence length (unless `truncate`), or images and markers
                do not match.
        """
        self._require_tokenizer()
        limit = self.settings["prompt"]["encoder_sequence_length"]
        rows = [self._prompt_ids(prompt) for prompt in prompts]
        for row in rows:
            if len(row) > limit and not truncate:
                raise ValueError(
                    f"A prompt has {len(row)} tokens but the encoder sequence length is {limit}; shorten it."
                )
        rows = [row[:limit] for row in rows]
        if self.settings["vision"]:
            placeholder = self.special_token_ids["image_placeholder"]
            for index, row in enumerate(rows):
                if row.count(placeholder) % self.settings["mm_tokens_per_image"]:
                    raise ValueError(f"Prompt {index} was truncated inside an image block; shorten it.")
        counts = [prompt.count(START_OF_IMAGE_PIECE) if self._image_markers() else 0 for prompt in prompts]
        pixels = self._images(images, counts)
        width = max(len(row) for row in rows)
        token_ids = np.full((len(rows), width), self.special_token_ids["pad"], np.int64)
        padding_mask = np.zeros((len(rows), width), np.int64)
        for index, row in enumerate(rows):
            token_ids[index, : len(row)] = row
            padding_mask[index, : len(row)] = 1
        return token_ids, padding_mask, pixels

    def _encoder_feeds(self, token_ids, padding_mask, pixel_values):
        feeds = {
            "encoder_token_ids": np.asarray(token_ids, np.int64),
            "encoder_padding_mask": np.asarray(padding_mask, np.int64),
        }
        if self.settings["vision"]:
            if pixel_values is None:
                size = self.settings["image_size"]
                pixel_values = np.zeros((len(feeds["encoder_token_ids"]), 0, size, size, 3), np.float32)
            feeds["pixel_values"] = np.asarray(pixel_values, np.float32)
        elif pixel_values is not None:
            raise ValueError("Images were given but this export is text-only.")
        return feeds

    # === Generation ===

    def generate_token_ids(
        self,
        encoder_token_ids,
        encoder_padding_mask,
        pixel_values=None,
        decoder_token_ids=None,
        decoder_padding_mask=None,
        max_length=None,
        stop_token_ids="eos",
        sampler="greedy",
        seed=None,
        **sampler_kwargs,
    ):
        """Generates decoder tokens from encoder token ids, as `T5Gemma2Seq2SeqLM.generate_step`.

        Args:
            encoder_token_ids, encoder_padding_mask: int `(B, S)`.
            pixel_values: float `(B, N, H, W, 3)` converted images, or None.
            decoder_token_ids, decoder_padding_mask: optional int `(B, P)`
                decoder prompts (default `<bos>` alone); ragged prompts are
                right-padded, and each row keeps its own tokens until the
                sampler passes its end.
            max_length: int, the decoder length (prompt + generated); at most
                `max_decode_length`. Defaults to `max_decode_length`.
            stop_token_ids: ids that end a sequence; `"eos"` for the
                tokenizer's end token, None to run to `max_length`.
            sampler: `"greedy"`, `"top_k"`, `"top_p"` or `"random"`;
                `sampler_kwargs` (`k`, `p`, `temperature`) go to `sample`.
            seed: int seed of the sampling generator.

        Returns:
            dict with `decoder_token_ids` and bool `decoder_padding_mask`
            `(B, max_length)`; positions after a stop token are masked.
        """
        max_length = self.max_decode_length if max_length is None else int(max_length)
        if max_length > self.max_decode_length:
            raise ValueError(
                f"`max_length` {max_length} is longer than the exported decoder cache of "
                f"{self.max_decode_length} positions; export again with a larger `max_decode_length`."
            )
        if stop_token_ids == "eos":
            stop_token_ids = None if self.tokenizer is None else (self.special_token_ids["eos"],)
        batch = len(encoder_token_ids)
        if decoder_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("This export has no tokenizer: pass `decoder_token_ids` (e.g. the start token).")
            decoder_token_ids = np.full((batch, 1), self.special_token_ids["bos"], np.int64)
            decoder_padding_mask = np.ones((batch, 1), np.int64)
        decoder_token_ids = np.asarray(decoder_token_ids, np.int64)
        prompt_mask = (
            np.ones(decoder_token_ids.shape, bool)
            if decoder_padding_mask is None
            else np.asarray(decoder_padding_mask).astype(bool)
        )
        lengths = prompt_mask.sum(axis=1)
        if lengths.max() > max_length:
            raise ValueError(
                f"A decoder prompt has {lengths.max()} tokens but `max_length` is {max_length} (the exported "
                f"cache holds {self.max_decode_length}); shorten it or export with a larger `max_decode_length`."
            )
        if lengths.min() < 1:
            raise ValueError("Every decoder prompt needs at least one token (the start token).")
        tokens = np.zeros((batch, max_length), np.int64)
        is_prompt = np.zeros((batch, max_length), bool)
        width = min(decoder_token_ids.shape[1], max_length)
        tokens[:, :width] = np.where(prompt_mask[:, :width], decoder_token_ids[:, :width], 0)
        is_prompt[:, :width] = prompt_mask[:, :width]

        encoder = self._session("encoder")
        encoder_feeds = self._encoder_feeds(encoder_token_ids, encoder_padding_mask, pixel_values)
        encoded = dict(zip([output.name for output in encoder.get_outputs()], encoder.run(None, encoder_feeds)))
        shape = (batch, self.max_decode_length, self.settings["num_key_value_heads"], self.settings["head_dim"])
        feeds = {"encoder_padding_mask": encoder_feeds["encoder_padding_mask"]}
        decoder = self._session("decoder")
        # float16 caches in the float16 graph sets.
        cache_dtype = _CACHE_DTYPES[next(i.type for i in decoder.get_inputs() if i.name == "past_key_0")]
        for layer in range(self.num_layers):
            feeds[f"past_key_{layer}"] = np.zeros(shape, cache_dtype)
            feeds[f"past_value_{layer}"] = np.zeros(shape, cache_dtype)
            feeds[f"cross_key_{layer}"] = encoded[f"cross_key_{layer}"]
            feeds[f"cross_value_{layer}"] = encoded[f"cross_value_{layer}"]
        output_names = [output.name for output in decoder.get_outputs()]

        def run(chunk, position):
            feeds["decoder_token_ids"] = chunk
            feeds["cache_position"] = np.array([position], np.int64)
            outputs = dict(zip(output_names, decoder.run(output_names, feeds)))
            for layer in range(self.num_layers):
                feeds[f"past_key_{layer}"] = outputs[f"present_key_{layer}"]
                feeds[f"past_value_{layer}"] = outputs[f"present_value_{layer}"]
            return outputs["logits"]

        # The first sampled position; positions before `index - 1` are
        # prefilled as one chunk, the loop goes on from `index - 1`.
        index = int(lengths.min())
        if index > 1:
            run(tokens[:, : index - 1], 0)
        rng = np.random.default_rng(seed)
        stop = np.asarray(stop_token_ids if stop_token_ids is not None else [], np.int64)
        done = np.zeros(batch, bool)
        for position in range(index - 1, max_length - 1):
            logits = run(tokens[:, position : position + 1], position)[:, -1]
            chosen = sample(logits, sampler, rng, **sampler_kwargs)
            keep = is_prompt[:, position + 1]
            tokens[:, position + 1] = np.where(keep, tokens[:, position + 1], chosen)
            done |= ~keep & np.isin(tokens[:, position + 1], stop)
            if stop.size and done.all():
                break

        if stop.size:
            is_stop = np.isin(tokens, stop) & ~is_prompt
            stops_before = np.cumsum(is_stop, axis=1) - is_stop
            padding_mask = stops_before == 0
        else:
            padding_mask = np.ones_like(tokens, bool)
        return {"decoder_token_ids": tokens, "decoder_padding_mask": padding_mask}

    def detokenize(self, token_ids, padding_mask):
        """Strings of the unmasked, non-special tokens of each row."""
        self._require_tokenizer()
        special = set(self.special_token_ids.values())
        return [
            self.tokenizer.decode([int(token) for token, real in zip(row, mask) if real and token not in special])
            for row, mask in zip(token_ids, padding_mask)
        ]

    def generate(self, prompts, images=None, max_length=None, sampler="greedy", seed=None, **sampler_kwargs):
        """Generates text for a prompt or a list of prompts.

        Args:
            prompts: a string or a list of strings; each `<start_of_image>`
                marks where one of the prompt's images goes.
            images: for a single prompt, an image or a list of images; for a
                list of prompts, one entry per prompt (None, an image or a
                list). Images are uint8 `(H, W, 3)` arrays or PIL images.
            max_length: decoder length (`<bos>` + generated tokens), at most
                the exported `max_decode_length` (the default).
            sampler: `"greedy"`, `"top_k"`, `"top_p"` or `"random"`.
            seed: int seed for the samplers that draw.
            **sampler_kwargs: `k`, `p`, `temperature`.

        Returns:
            A string, or a list of strings for a list of prompts.
        """
        single = isinstance(prompts, str)
        if single:
            prompts = [prompts]
            images = None if images is None else [images]
        token_ids, padding_mask, pixel_values = self.encoder_inputs(prompts, images)
        outputs = self.generate_token_ids(
            token_ids,
            padding_mask,
            pixel_values,
            max_length=max_length,
            sampler=sampler,
            seed=seed,
            **sampler_kwargs,
        )
        texts = self.detokenize(outputs["decoder_token_ids"], outputs["decoder_padding_mask"])
        return texts[0] if single else texts

    # === Embeddings ===

    def embed(self, inputs, batch_size=32):
        """Embedding vectors `(B, hidden_dim)`, as `T5Gemma2Embedder.predict` (`T5GemmaEmbedder`) gives them.

        `hidden_dim` is the encoder's width (the first family's encoder and
        decoder widths may differ).

        Args:
            inputs: a string, a dict `{"text": ..., "images": ...}` (images
                one per `<start_of_image>` marker), or a list of those. A
                dict with images and no text gives the image-only vector
                (the mean of its images' soft tokens).
            batch_size: prompts per encoder call.

        Pooling and normalisation are the export's (`settings["embedder"]`).
        """
        if isinstance(inputs, (str, dict)):
            inputs = [inputs]
        samples = []
        for index, item in enumerate(inputs):
            text, images = (item, None) if isinstance(item, str) else (item.get("text"), item.get("images"))
            if images is not None and not isinstance(images, (list, tuple)):
                images = [images]
            if (text is None or not text.strip()) and not images:
                raise ValueError(f"Sample {index} has neither text nor images.")
            samples.append((text if text and text.strip() else None, images))
        if not samples:
            raise ValueError("There is nothing to embed: the input is empty.")
        embedder = self._session("embedder")
        vectors = np.zeros((len(samples), self.settings["hidden_dim"]), np.float32)
        prompts = [index for index, (text, _) in enumerate(samples) if text is not None]
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            token_ids, padding_mask, pixels = self.encoder_inputs(
                [samples[i][0] for i in chunk], [samples[i][1] for i in chunk], truncate=True
            )
            feeds = self._encoder_feeds(token_ids, padding_mask, pixels)
            vectors[chunk] = embedder.run(["embedding"], feeds)[0]
        for index, (text, images) in enumerate(samples):
            if text is not None:
                continue
            if not self.settings["vision"]:
                raise ValueError("Image-only inputs need a vision model; this export is text-only.")
            pixels = np.stack([convert_image(image, self.settings["image_converter"]) for image in images])[None]
            feeds = self._encoder_feeds(np.array([[self.special_token_ids["bos"]]]), np.ones((1, 1)), pixels)
            vectors[index] = embedder.run(["image_embedding"], feeds)[0][0]
        return vectors
