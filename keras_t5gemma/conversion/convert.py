"""Converts a Hugging Face T5Gemma 2 checkpoint to a Keras preset folder, and checks it.

The command line is `keras-t5gemma convert` (`keras_t5gemma.cli`). `convert`
takes a local Hugging Face folder, an `hf://org/name` handle, a bare
`org/name` hub id, or a released preset name; its output loads with
`T5Gemma2Seq2SeqLM.from_preset(OUTPUT)`. `verify` loads the same weights in
`transformers` (when installed), reports the largest logit difference and
how many greedy tokens agree, and says whether they agree within the
tolerance of the converted dtype (`VERIFY_TOLERANCE`).
"""

import os
import time

import keras
import numpy as np

from keras_t5gemma.conversion.preset_loader import T5Gemma2CheckpointLoader
from keras_t5gemma.conversion.weights import load_weights
from keras_t5gemma.conversion.weights import weight_specs
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.utils.preset_utils import get_preset_loader
from keras_t5gemma.utils.safe_files import check_writable_folder


def _source(source):
    """Accepts `org/name` hub ids as well as what `from_preset` takes."""
    if "://" not in source and not os.path.exists(source) and source.count("/") == 1:
        return f"hf://{source}"
    return source


# Largest logit difference accepted by `verify`, relative to the logit scale.
# float32 matches the reference up to rounding; bfloat16 (8 significant bits)
# and float16 (11) weights and compute drift by a few of their ulps per layer.
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def check_output_folder(source, output, overwrite=False):
    """Refuses an `output` that is, holds or lies inside a local `source`, or is not empty.

    Raises:
        ValueError: `output` and `source` overlap.
        FileExistsError: `output` is a non-empty folder and `overwrite` is False.
    """
    if os.path.exists(source):
        source_path, output_path = os.path.realpath(source), os.path.realpath(output)
        if output_path == source_path or output_path.startswith(source_path + os.sep):
            raise ValueError(
                f"The output folder `{output}` is (inside) the source `{source}`; a conversion never "
                "writes into its source. Choose another output folder."
            )
        if source_path.startswith(output_path + os.sep):
            raise ValueError(f"The output folder `{output}` holds the source `{source}`. Choose another folder.")
    check_writable_folder(output, overwrite)


def convert(source, output, dtype="float32", text_only=False, overwrite=False, log=print):
    """Converts `source` and saves it to `output`; returns the Keras model and the loader.

    `output` must be absent or empty unless `overwrite` (then the previous
    preset's files are replaced, other files kept); it never overlaps a local
    `source`.
    """
    source = _source(source)
    check_output_folder(source, output, overwrite)
    loader = get_preset_loader(source)
    if not isinstance(loader, T5Gemma2CheckpointLoader):
        raise ValueError(f"`{source}` is already a Keras preset; there is nothing to convert.")
    started = time.time()
    backbone = loader.load_backbone(T5Gemma2Backbone, False, text_only=text_only, dtype=dtype)
    log(f"Built the backbone ({backbone.count_params():,} parameters, {dtype}) in {time.time() - started:.1f}s.")
    progress = keras.utils.Progbar(len(list(weight_specs(backbone))), unit_name="tensor")
    checkpoint = loader.checkpoint
    load_weights(backbone, checkpoint.keys(), checkpoint.read, progress=progress.add)
    preprocessor_kwargs = {"image_converter": None} if text_only else {}
    preprocessor = loader.load_preprocessor(T5Gemma2Seq2SeqLM.preprocessor_cls, **preprocessor_kwargs)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(backbone, preprocessor)
    seq_2_seq_lm.save_to_preset(output, overwrite=overwrite)
    log(f"Saved the preset to {output} ({time.time() - started:.1f}s in all).")
    return seq_2_seq_lm, loader


def verify(seq_2_seq_lm, loader, new_tokens=16, log=print):
    """Max logit difference and greedy agreement against `transformers` on a fixed prompt.

    The reference runs in float32. The check passes when the largest logit
    difference is within `VERIFY_TOLERANCE[dtype]` of the logit scale (the
    dtype of the converted weights) and, for float32, every greedy token
    agrees (at lower precision a near tie may flip a token, which is
    reported but not failed).

    Returns:
        `(max_abs_logit_diff, logit_scale, agreeing_tokens, new_tokens, passed)`,
        or `None` when `torch` or `transformers` is missing.
    """
    try:
        import torch
        from transformers import T5Gemma2ForConditionalGeneration
    except ImportError:
        log("--verify needs `torch` and `transformers`; skipped.")
        return None
    folder = os.path.dirname(loader.checkpoint.path("config.json"))
    reference = T5Gemma2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    vocabulary = loader.config["decoder"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(3, min(vocabulary, 255_999), (1, 24)).astype("int32")
    prompt[0, 0] = 2
    mask = np.ones_like(prompt)
    decoder = np.array([[2]], "int32")
    with torch.no_grad():
        expected_logits = reference(
            input_ids=torch.tensor(prompt).long(),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(decoder).long(),
        ).logits.numpy()
        expected_tokens = reference.generate(
            input_ids=torch.tensor(prompt).long(),
            attention_mask=torch.tensor(mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
        ).numpy()[0]
    inputs = {
        "encoder_token_ids": prompt,
        "encoder_padding_mask": mask,
        "decoder_token_ids": decoder,
        "decoder_padding_mask": np.ones_like(decoder),
    }
    backbone = seq_2_seq_lm.backbone
    hidden = backbone(inputs)["decoder_sequence_output"]
    logits = keras.ops.convert_to_numpy(keras.ops.cast(backbone.token_embedding.logits(hidden), "float32"))
    difference = float(np.abs(logits - expected_logits).max())
    scale = float(np.abs(expected_logits).max())
    on_ids = T5Gemma2Seq2SeqLM(backbone)
    on_ids.compile(sampler="greedy")
    generate_inputs = dict(inputs)
    generate_inputs["decoder_token_ids"] = np.zeros((1, new_tokens + 1), "int32")
    generate_inputs["decoder_token_ids"][0, 0] = 2
    generate_inputs["decoder_padding_mask"] = (generate_inputs["decoder_token_ids"] > 0).astype("int32")
    tokens = on_ids.generate(generate_inputs, stop_token_ids=None)["decoder_token_ids"][0]
    agreeing = int((tokens[1:] == expected_tokens[1:]).sum())
    log(f"max |logit difference| = {difference:.3g} (logit scale {scale:.3g}, relative {difference / scale:.3g})")
    log(f"greedy tokens agreeing with transformers: {agreeing}/{new_tokens}")
    dtype = keras.backend.standardize_dtype(backbone.compute_dtype)
    tolerance = VERIFY_TOLERANCE.get(dtype, VERIFY_TOLERANCE["bfloat16"])
    passed = difference <= tolerance * scale and (agreeing == new_tokens or dtype != "float32")
    if passed:
        log(f"verified: within {tolerance:g} of the logit scale ({dtype})")
    else:
        log(
            f"MISMATCH: the converted model does not agree with transformers ({dtype}: logits must be within "
            f"{tolerance:g} of the logit scale" + (", every greedy token equal)" if dtype == "float32" else ")")
        )
    return difference, scale, agreeing, new_tokens, passed
