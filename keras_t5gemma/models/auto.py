"""The sequence-to-sequence task for any preset, of either family (as `transformers`' `Auto` classes pick one)."""

from keras_t5gemma.models.t5gemma.t5gemma_backbone import T5GemmaBackbone
from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.utils.preset_utils import get_preset_loader
from keras_t5gemma.utils.preset_utils import resolve_preset


def seq_2_seq_lm_class(preset):
    """`T5GemmaSeq2SeqLM` for a T5Gemma (first generation) preset, else `T5Gemma2Seq2SeqLM`.

    Raises:
        ValueError: for an unknown preset name (listing the known ones) or
            a file that is not a preset.
    """
    resolve_preset(preset)  # an unknown name fails here, with the list of known ones
    backbone_cls = get_preset_loader(preset).check_backbone_class()
    return T5GemmaSeq2SeqLM if issubclass(backbone_cls, T5GemmaBackbone) else T5Gemma2Seq2SeqLM


def load_seq_2_seq_lm(preset, **kwargs):
    """`from_preset(preset, **kwargs)` of the preset's family's sequence-to-sequence task.

    Example:
    ```python
    seq_2_seq_lm = load_seq_2_seq_lm("t5gemma2_tiny_digits")
    type(seq_2_seq_lm).__name__  # 'T5Gemma2Seq2SeqLM'
    ```
    """
    return seq_2_seq_lm_class(preset).from_preset(preset, **kwargs)
