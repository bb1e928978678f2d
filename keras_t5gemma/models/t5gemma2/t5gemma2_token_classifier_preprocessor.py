"""Words and per-word labels to `T5Gemma2TokenClassifier` inputs, labels and weights."""

import keras
import numpy as np
from keras_hub.models import Preprocessor

from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import T5Gemma2Tokenizer
from keras_t5gemma.utils.keras_hub_compat import tf
from keras_t5gemma.utils.preset_utils import PresetMixin


def _words(sample):
    """One sample as a list of words: a string is split on whitespace."""
    if isinstance(sample, bytes):
        sample = sample.decode("utf-8")
    if isinstance(sample, str):
        return sample.split()
    if isinstance(sample, (list, tuple, np.ndarray)) and all(isinstance(word, (str, bytes)) for word in sample):
        return [word.decode("utf-8") if isinstance(word, bytes) else word for word in sample]
    raise ValueError(f"A sample must be a string or a list of words; got {type(sample).__name__}.")


@keras.saving.register_keras_serializable(package="keras_t5gemma")
class T5Gemma2TokenClassifierPreprocessor(PresetMixin, Preprocessor):
    """Prepares words, with one label per word, for `T5Gemma2TokenClassifier`.

    Each word is tokenized on its own (after a space, except the first), so
    each token belongs to one word; the sample is `<bos>` + its words'
    tokens, right-padded (and truncated) to `sequence_length`. A word's label
    goes on its first token, which alone has `sample_weight` 1 (the other
    tokens, `<bos>` and padding have 0, as the reference's `-100` labels).
    Words cut off by truncation lose their labels.

    Inputs: one sample as a string (split on whitespace), or a list of
    samples, each a string or a list of words; labels `y`: per sample a
    list of class indices, one per word.
    Runs eagerly on Python input (the classifier preprocesses before `fit`,
    `evaluate` and `predict`).

    Outputs: `x` with `encoder_token_ids`, `encoder_padding_mask`
    `(B, sequence_length)`; with labels also `y` (int32) and `sample_weight`
    (float32), both `(B, sequence_length)`.

    Args:
        tokenizer: a `T5Gemma2Tokenizer`.
        sequence_length: int, padded length.
        add_start_token, add_end_token: `<bos>`/`<eos>` around the words.

    Example:
    ```python
    preprocessor = T5Gemma2TokenClassifierPreprocessor.from_preset(
        "t5gemma2_tiny_digits", sequence_length=8
    )
    x, y, sample_weight = preprocessor(["sort: 3 1"], y=[[0, 1, 1]])
    sample_weight  # [[0, 1, 1, 1, 0, 0, 0, 0]]: `<bos>` and padding are not scored
    ```
    """

    backbone_cls = T5Gemma2Backbone
    tokenizer_cls = T5Gemma2Tokenizer

    def __init__(self, tokenizer, sequence_length=512, add_start_token=True, add_end_token=False, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    @staticmethod
    def as_word_lists(x):
        """Any accepted input as a list of samples, each a list of words."""
        if tf.is_tensor(x):
            x = x.numpy().tolist()
        if isinstance(x, (str, bytes)):
            x = [x]
        samples = [_words(sample) for sample in x]
        if not samples:
            raise ValueError("There is nothing to classify: the input is empty.")
        return samples

    def first_token_positions(self, x, sequence_length=None):
        """Per sample, the position of each word's first token (words cut off by truncation left out)."""
        return self._layout(self.as_word_lists(x), sequence_length or self.sequence_length)[2]

    def _layout(self, samples, sequence_length):
        """`(token ids (B, L), padding mask (B, L), first-token positions per sample)`."""
        tokenizer = self.tokenizer
        pieces = [[word if i == 0 else f" {word}" for i, word in enumerate(words)] for words in samples]
        flat = [piece for sample in pieces for piece in sample]
        flat_ids = [list(np.asarray(ids).reshape(-1)) for ids in tokenizer(flat)] if flat else []
        token_ids = np.full((len(samples), sequence_length), tokenizer.pad_token_id, "int32")
        padding_mask = np.zeros((len(samples), sequence_length), "int32")
        positions = []
        cursor = 0
        for row, sample in enumerate(pieces):
            ids = [tokenizer.start_token_id] if self.add_start_token else []
            firsts = []
            for word_ids in flat_ids[cursor : cursor + len(sample)]:
                firsts.append(len(ids))
                ids.extend(int(i) for i in word_ids)
            cursor += len(sample)
            if self.add_end_token:
                ids.append(tokenizer.end_token_id)
            ids = ids[:sequence_length]
            token_ids[row, : len(ids)] = ids
            padding_mask[row, : len(ids)] = 1
            positions.append([p for p in firsts if p < len(ids)])
        return token_ids, padding_mask, positions

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if sample_weight is not None:
            raise ValueError("Token sample weights come from the words' first tokens; pass no `sample_weight`.")
        samples = self.as_word_lists(x)
        sequence_length = sequence_length or self.sequence_length
        token_ids, padding_mask, positions = self._layout(samples, sequence_length)
        inputs = {"encoder_token_ids": token_ids, "encoder_padding_mask": padding_mask}
        if y is None:
            return inputs
        y = list(y)
        if len(y) != len(samples):
            raise ValueError(f"Got {len(samples)} samples but labels for {len(y)}.")
        labels = np.zeros(token_ids.shape, "int32")
        weights = np.zeros(token_ids.shape, "float32")
        for row, (words, word_labels, firsts) in enumerate(zip(samples, y, positions)):
            word_labels = np.asarray(word_labels)
            if word_labels.ndim != 1 or len(word_labels) != len(words):
                raise ValueError(
                    f"Sample {row} has {len(words)} words but labels of shape {word_labels.shape}; "
                    "give one class index per word."
                )
            if word_labels.size and not np.issubdtype(word_labels.dtype, np.integer):
                raise ValueError(f"Sample {row}: labels must be integer class indices; got {word_labels.tolist()}.")
            labels[row, firsts] = word_labels[: len(firsts)]
            weights[row, firsts] = 1.0
        return inputs, labels, weights

    def get_config(self):
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }
