"""The task classes for any preset, of either family (as `transformers`' `Auto` classes pick one)."""

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
from keras_t5gemma.models.t5gemma.t5gemma_text_classifier import T5GemmaTextClassifier
from keras_t5gemma.models.t5gemma.t5gemma_token_classifier import T5GemmaTokenClassifier
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.models.t5gemma2.t5gemma2_text_classifier import T5Gemma2TextClassifier
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier import T5Gemma2TokenClassifier
from keras_t5gemma.utils.preset_utils import get_preset_loader
from keras_t5gemma.utils.preset_utils import resolve_preset


def _is_first_family(preset):
    resolve_preset(preset)  # an unknown name fails here, with the list of known ones
    return issubclass(get_preset_loader(preset).check_backbone_class(), T5GemmaBackbone)


def classifier_class(preset, per_word=False):
    """The preset's family's text classifier (with `per_word`, its token classifier).

    Example:
    ```python
    classifier_class("t5gemma2_tiny_digits", per_word=True).__name__  # 'T5Gemma2TokenClassifier'
    ```
    """
    if _is_first_family(preset):
        return T5GemmaTokenClassifier if per_word else T5GemmaTextClassifier
    return T5Gemma2TokenClassifier if per_word else T5Gemma2TextClassifier


def seq_2_seq_lm_class(preset):
    """`T5GemmaSeq2SeqLM` for a T5Gemma (first generation) preset, else `T5Gemma2Seq2SeqLM`.

    Raises:
        ValueError: for an unknown preset name (listing the known ones) or
            a file that is not a preset.
    """
    return T5GemmaSeq2SeqLM if _is_first_family(preset) else T5Gemma2Seq2SeqLM


def load_seq_2_seq_lm(preset, **kwargs):
    """`from_preset(preset, **kwargs)` of the preset's family's sequence-to-sequence task.

    Example:
    ```python
    seq_2_seq_lm = load_seq_2_seq_lm("t5gemma2_tiny_digits")
    type(seq_2_seq_lm).__name__  # 'T5Gemma2Seq2SeqLM'
    ```
    """
    return seq_2_seq_lm_class(preset).from_preset(preset, **kwargs)
