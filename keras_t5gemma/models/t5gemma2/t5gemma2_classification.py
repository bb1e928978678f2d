"""Where the T5Gemma 2 classifiers read: the full encoder-decoder, as the reference does.

The reference (`T5Gemma2ForSequenceClassification`, `...ForTokenClassification`
in `transformers` 5.23) always runs the full encoder-decoder; T5Gemma 2 has no
encoder-only classification form. From `input_ids` and `attention_mask` it
builds:
- the encoder input: `input_ids` with `attention_mask` (and the images);
- the decoder input: `input_ids` shifted right by one, `<bos>` (the decoder's
  `bos_token_id`) first, with no decoder padding mask (causal attention only).
The sequence classifier reads the head at the last decoder position whose
input id is not `pad_token_id`; the token classifier at every position.
The rest of the classifiers (head, label checks, loading) is shared with the
first family: `models/classification.py`.
"""

from keras import ops

from keras_t5gemma.models.classification import ClassifierTask
from keras_t5gemma.models.classification import decoder_token_ids_from_encoder
from keras_t5gemma.models.classification import last_non_pad_position

# The earlier name of the classifiers' base, which the loaders and the exporter check for.
T5Gemma2Classifier = ClassifierTask


def t5gemma2_reference_states(backbone, inputs, start_token_id, pad_token_id):
    """`(decoder hidden states (B, S, D), read position (B,))` of the reference for encoder `inputs`."""
    if backbone.decoder is None:
        raise ValueError("The classifier runs the decoder, as the reference does; this backbone is encoder-only.")
    decoder_token_ids = decoder_token_ids_from_encoder(inputs["encoder_token_ids"], start_token_id)
    outputs = backbone(
        {
            **inputs,
            "decoder_token_ids": decoder_token_ids,
            # No decoder padding mask: the reference passes none, so attention is causal only.
            "decoder_padding_mask": ops.ones_like(decoder_token_ids),
        }
    )
    return outputs["decoder_sequence_output"], last_non_pad_position(decoder_token_ids, pad_token_id)
