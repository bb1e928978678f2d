"""`T5Gemma2TextClassifier` and `T5Gemma2TokenClassifier`: parity with `transformers`' heads,
loading (Hugging Face heads, new heads, folders without tokenizer files), training and errors."""

import logging
import warnings

import keras
import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from hf_reference import BOI
from hf_reference import EOI
from hf_reference import IMAGE
from hf_reference import reference_model
from hf_reference import tiny_config
from transformers import T5Gemma2ForSequenceClassification
from transformers import T5Gemma2ForTokenClassification

from keras_t5gemma import T5Gemma2Seq2SeqLM
from keras_t5gemma import T5Gemma2TextClassifier
from keras_t5gemma import T5Gemma2TokenClassifier

LABELS = ["negative", "neutral", "positive"]
HEADS = {
    "sequence": (T5Gemma2ForSequenceClassification, T5Gemma2TextClassifier),
    "token": (T5Gemma2ForTokenClassification, T5Gemma2TokenClassifier),
}


def _config(**top):
    # A vision tower, three labels with names, and a <pad> id that is not 0 to catch a hard-coded one.
    return tiny_config(
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        **top,
    )


@pytest.fixture(scope="module", params=list(HEADS))
def checkpoint(request, tmp_path_factory):
    """A Hugging Face classification checkpoint folder (no tokenizer files) and its reference model."""
    reference_class, task_class = HEADS[request.param]
    model = reference_model(_config(), seed=7, model_class=reference_class)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = task_class.from_preset(str(folder), preprocessor=None)
    return model, classifier, request.param, folder


def _reference_logits(model, ids, mask, flat_images=None):
    pixel_values = None if flat_images is None else torch.tensor(flat_images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask), pixel_values=pixel_values
        ).logits.numpy()


def _padded(rng, lengths, length, left=False):
    ids = np.zeros((len(lengths), length), "int32")
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(length - n, length) if left else slice(0, n)
        ids[row, span] = rng.integers(3, 290, n)
        ids[row, span.start] = 2  # <bos>
        mask[row, span] = 1
    return ids, mask


def _compare(classifier, kind, ours, reference, mask):
    if kind == "token":
        # Padding positions are free; the reference scores them, but nothing reads them.
        mask = np.repeat(mask[..., None], reference.shape[-1], -1)
        assert_matches_reference(ours, reference, mask)
    else:
        assert_matches_reference(ours, reference)


def test_the_head_and_its_labels_come_from_the_checkpoint(checkpoint):
    model, classifier, _, _ = checkpoint
    assert classifier.num_classes == 3 and classifier.labels == LABELS
    assert classifier.preprocessor is None
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(classifier.output_dense.bias), model.score.out_proj.bias.detach().numpy()
    )


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_padded_text_batch_matches_reference(checkpoint, rng, left):
    model, classifier, kind, _ = checkpoint
    ids, mask = _padded(rng, [11, 6, 3], 11, left=left)
    reference = _reference_logits(model, ids, mask)
    ours = keras.ops.convert_to_numpy(classifier({"encoder_token_ids": ids, "encoder_padding_mask": mask}))
    _compare(classifier, kind, ours, reference, mask)


def test_batch_with_an_image_matches_reference(checkpoint, rng):
    model, classifier, kind, _ = checkpoint
    image_block = [BOI] + [IMAGE] * 4 + [EOI]
    rows = [[2, 17, 40, *image_block, 33, 9], [2, 51, 8, 77]]
    length = max(map(len, rows))
    ids = np.array([row + [0] * (length - len(row)) for row in rows], "int32")
    mask = (np.arange(length) < np.array([[len(row)] for row in rows])).astype("int32")
    images = rng.normal(size=(2, 1, 28, 28, 3)).astype("float32")
    reference = _reference_logits(model, ids, mask, images[:1, 0])
    ours = classifier.predict({"encoder_token_ids": ids, "encoder_padding_mask": mask, "images": images}, verbose=0)
    _compare(classifier, kind, ours, reference, mask)


def test_generation_checkpoint_gets_a_new_head_with_a_log_line(tmp_path, caplog):
    config = tiny_config()
    reference_model(config, seed=1).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="keras_t5gemma"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = T5Gemma2TextClassifier.from_preset(str(tmp_path), num_classes=4, preprocessor=None)
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(tmp_path), preprocessor=None)
    assert "newly initialised" in caplog.text
    assert classifier.num_classes == 4 and classifier.labels is None
    # Same backbone weights as the generation model; the head is new.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(classifier.backbone.token_embedding.table.embeddings),
        keras.ops.convert_to_numpy(seq_2_seq_lm.backbone.token_embedding.table.embeddings),
    )
    with pytest.raises(ValueError, match="needs `num_classes`"):
        T5Gemma2TextClassifier.from_preset(str(tmp_path), preprocessor=None)


def test_classification_checkpoint_loads_as_a_generation_model(checkpoint):
    _, _, _, folder = checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(folder), preprocessor=None)
    assert seq_2_seq_lm.preprocessor is None
