"""Token-by-token generation: `stream_generate`, and the compiled decoder it (and the server) runs.

`T5Gemma2Seq2SeqLM.generate` runs its whole decode loop inside one compiled
function, so nothing comes out before the last token. Here the same two parts
of `generate_step` are compiled apart: `DecoderSteps.start` (encode once, the
decoder's cross keys/values once, empty self-attention caches) and
`DecoderSteps.step` (one decoder token against the caches, the next-token
logits out); the loop between them runs in Python, so each token can be handed
out as soon as it is chosen, a row can stop early, and a server can drop a row
whose client left. Greedy decoding picks the same tokens as `generate` with
`compile(sampler="greedy")`: the same layers, the argmax of the same float32
logits.

Example:
```python
from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma.models.streaming import stream_generate

seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
for piece in stream_generate(seq_2_seq_lm, "reverse: 1 2 3", max_length=16, sampler="greedy"):
    print(piece, end="", flush=True)
```
"""

import keras
import numpy as np
from keras import ops
from keras_hub import samplers

from keras_t5gemma.models.samplers import ArgmaxSampler
from keras_t5gemma.models.samplers import first_argmax

# A decode of an unfinished multi-byte character ends with this (SentencePiece's byte fallback).
REPLACEMENT_CHARACTER = "\ufffd"


class DecoderSteps:
    """`start` and `step` of a T5Gemma 2 (or T5Gemma) task's decode loop, compiled on JAX.

    On JAX each function is jitted once per input shape over the model's
    variables as arguments (not constants), with the self-attention caches
    donated so a step updates them in place. Other backends run them
    eagerly.

    Args:
        seq_2_seq_lm: a `T5Gemma2Seq2SeqLM` or `T5GemmaSeq2SeqLM`.
    """

    def __init__(self, seq_2_seq_lm):
        self.seq_2_seq_lm = seq_2_seq_lm
        self._variables = list(seq_2_seq_lm.variables)
        self._start = self._stateless(self._start_fn)
        self._step = self._stateless(self._step_fn, donate_cache=True)

    def _start_fn(self, inputs, max_length):
        return self.seq_2_seq_lm._initial_cache(inputs, max_length)

    def _step_fn(self, token_ids, cache, index):
        # token_ids (B, T) at positions index + t; the logits of the last one.
        hidden, cache = self.seq_2_seq_lm._decoder_step(token_ids, cache, index)
        logits = ops.cast(self.seq_2_seq_lm.backbone.token_embedding.logits(hidden[:, -1, :]), "float32")
        return logits, first_argmax(logits), cache

    def _stateless(self, function, donate_cache=False):
        if keras.config.backend() != "jax":
            if keras.config.backend() == "torch":
                import torch

                return torch.no_grad()(function)
            return function
        import jax

        variables = self._variables

        def with_state(state, *args):
            with keras.StatelessScope(state_mapping=zip(variables, state)):
                return function(*args)

        if function == self._start_fn:
            compiled = jax.jit(with_state, static_argnums=(2,))
        else:
            compiled = jax.jit(with_state, donate_argnums=(2,) if donate_cache else ())

        def call(*args):
            return compiled([variable.value for variable in variables], *args)

        return call

    def start(self, inputs, max_length):
        """The decode state for `inputs` (the backbone's encoder inputs, `images` for a vision model).

        Args:
            inputs: dict with `encoder_token_ids`, `encoder_padding_mask`
                `(B, S)` int32 and, for a vision model, `images`
                `(B, N, H, W, 3)` float32.
            max_length: int, the self-attention cache length (decoder
                positions, `<bos>` included).
        """
        return self._start(inputs, int(max_length))

    def step(self, token_ids, cache, index):
        """Runs `token_ids` `(B, T)` at positions `index + t`.

        Returns:
            `(logits (B, V) float32, argmax (B,) int, cache)`, the logits
            of the last position; arrays stay on the device until read.
        """
        return self._step(token_ids, cache, np.int32(index))


class IncrementalDetokenizer:
    """Text pieces of a growing token sequence whose concatenation is the whole sequence's text.

    Each `push` decodes the tokens so far and hands out what is new; a
    decode ending in an unfinished character (byte fallback) waits for the
    next token. Special tokens are skipped, as `generate` strips them.

    Args:
        decode: function from a list of token ids to a string.
        skip_ids: ids that are never text (`<bos>`, `<eos>`, `<pad>`, ...).
    """

    def __init__(self, decode, skip_ids=()):
        self._decode = decode
        self._skip_ids = set(int(token) for token in skip_ids)
        self._ids = []
        self.text = ""

    def push(self, token_id):
        """The new text after `token_id` (often `""`)."""
        if int(token_id) in self._skip_ids:
            return ""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT_CHARACTER) or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece

    def flush(self):
        """Whatever is left (an unfinished character as the decoder renders it)."""
        text = self._decode(self._ids)
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text if piece or text.startswith(self.text) else self.text
        return piece


def sentencepiece_decoder(tokenizer):
    """A fast `ids -> text` for a KerasHub SentencePiece tokenizer (its own model proto, in C++)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.proto)
    return lambda ids: processor.decode(ids)


def _resolve_sampler(seq_2_seq_lm, sampler):
    if sampler is None:
        sampler = getattr(seq_2_seq_lm, "sampler", None) or "greedy"
    if sampler == "greedy":
        return ArgmaxSampler()
    if isinstance(sampler, str):
        sampler = samplers.get(sampler)
    if isinstance(sampler, samplers.BeamSampler):
        raise ValueError("Beam search cannot stream: its best sequence is known only at the end.")
    return sampler


def stream_generate(seq_2_seq_lm, inputs, max_length=None, sampler=None, stop_token_ids="auto"):
    """Generates for one prompt, yielding text pieces as tokens are chosen.

    The pieces joined are what `seq_2_seq_lm.generate(inputs, max_length)`
    returns with the same sampler (greedy: the same tokens exactly).

    Args:
        seq_2_seq_lm: a `T5Gemma2Seq2SeqLM` (or `T5GemmaSeq2SeqLM`) with a
            preprocessor.
        inputs: a prompt string, or a dict with `encoder_text` (a string),
            optionally `images` (the prompt's images, one per
            `<start_of_image>`) and `decoder_text` (a decoder prompt).
        max_length: decoder length in tokens, `<bos>` included (default: the
            preprocessor's `decoder_sequence_length`).
        sampler: `"greedy"`, a KerasHub sampler name or instance (its
            `temperature`, `k`, `p` and seed are used per step), or `None`
            for the sampler given to `compile` (greedy if none).
        stop_token_ids: `"auto"` (the tokenizer's `<eos>`), a tuple of ids,
            or `None` to run to `max_length`.

    Yields:
        str pieces of the answer.
    """
    preprocessor = seq_2_seq_lm.preprocessor
    if preprocessor is None:
        raise ValueError("`stream_generate` needs a task with a preprocessor (it takes and yields strings).")
    text = inputs["encoder_text"] if isinstance(inputs, dict) else inputs
    if not isinstance(text, str):
        raise ValueError(f"`stream_generate` takes one prompt (a string); got {type(text).__name__}.")
    sampler = _resolve_sampler(seq_2_seq_lm, sampler)
    tokenizer = preprocessor.tokenizer
    stop = (tokenizer.end_token_id,) if stop_token_ids == "auto" else tuple(stop_token_ids or ())
    max_length = max_length or preprocessor.decoder_sequence_length
    if isinstance(inputs, dict) and inputs.get("images") is not None:
        inputs = {**inputs, "images": [inputs["images"]]}
    batch = {**inputs, "encoder_text": [text]} if isinstance(inputs, dict) else {"encoder_text": [text]}
    if isinstance(inputs, dict) and "decoder_text" in inputs:
        batch["decoder_text"] = [inputs["decoder_text"]]
    prepared = preprocessor.generate_preprocess(batch, decoder_sequence_length=max_length)
    prepared = {key: ops.convert_to_numpy(value) for key, value in prepared.items()}
    decoder_ids = prepared.pop("decoder_token_ids")
    prompt_length = int(prepared.pop("decoder_padding_mask").sum())

    steps = getattr(seq_2_seq_lm, "_decoder_steps", None)
    if steps is None:
        steps = DecoderSteps(seq_2_seq_lm)
        seq_2_seq_lm._decoder_steps = steps
    cache = steps.start(prepared, max_length)
    special = tokenizer.special_token_ids
    detokenizer = IncrementalDetokenizer(sentencepiece_decoder(tokenizer), special)
    tokens = decoder_ids[:, :prompt_length].astype("int32")
    position = 0
    if prompt_length > 1:
        # The decoder prompt before its last token, cached in one pass.
        _, _, cache = steps.step(tokens[:, :-1], cache, 0)
        position = prompt_length - 1
    token = tokens[:, -1:]
    for position in range(position, max_length - 1):
        logits, argmax, cache = steps.step(token, cache, position)
        if isinstance(sampler, samplers.GreedySampler):
            # The argmax of the logits is the argmax of their softmax.
            next_token = int(np.asarray(argmax)[0])
        else:
            probabilities = sampler.compute_probabilities(logits)
            next_token = int(ops.convert_to_numpy(sampler.get_next_token(probabilities))[0])
        piece = detokenizer.push(next_token)
        if piece:
            yield piece
        if next_token in stop:
            break
        token = np.array([[next_token]], "int32")
    piece = detokenizer.flush()
    if piece:
        yield piece
