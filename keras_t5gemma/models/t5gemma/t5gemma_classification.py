"""Where the T5Gemma (first generation) classifiers read, in the reference's two forms.

`transformers`' `T5GemmaForSequenceClassification` and `...ForTokenClassification`
(5.23) come in two forms, chosen by the config's `is_encoder_decoder`; here the
backbone chooses (`encoder_only`):
- encoder-decoder: the decoder reads `input_ids` shifted right behind the
  decoder's `<bos>`, with the padding mask `decoder ids != pad_token_id` (the
  reference's default mask when none is given); a sequence is read one
  position after its last non-pad input id (the shift), kept inside the
  sequence;
- encoder-only: the head reads the encoder's states; a sequence is read at
  its last non-pad input id.
Differences from T5Gemma 2, which always runs the decoder, with no decoder
padding mask, reading the last non-pad decoder id.
"""

from keras import ops

from keras_t5gemma.models.classification import decoder_token_ids_from_encoder
from keras_t5gemma.models.classification import last_non_pad_position


def t5gemma_reference_states(backbone, inputs, start_token_id, pad_token_id):
    """`(hidden states (B, S, D), read position (B,))` of the reference for encoder `inputs`."""
    token_ids = inputs["encoder_token_ids"]
    if backbone.decoder is None:
        hidden = backbone(inputs)["encoder_sequence_output"]
        return hidden, last_non_pad_position(token_ids, pad_token_id)
    decoder_token_ids = decoder_token_ids_from_encoder(token_ids, start_token_id)
    outputs = backbone(
        {
            **inputs,
            "decoder_token_ids": decoder_token_ids,
            "decoder_padding_mask": ops.cast(ops.not_equal(decoder_token_ids, pad_token_id), "int32"),
        }
    )
    return outputs["decoder_sequence_output"], last_non_pad_position(token_ids, pad_token_id, shift=1)
