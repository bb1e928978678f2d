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


def test_export_to_transformers_gives_back_the_classification_checkpoint(checkpoint, tmp_path, rng):
    model, _, kind, folder = checkpoint
    # A head changed in Keras must reach transformers: redraw it first (on a classifier of its own, so that the
    # shared fixture's stays the reference's).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = HEADS[kind][1].from_preset(str(folder), preprocessor=None)
    head = classifier.output_dense
    head.kernel.assign(rng.normal(size=head.kernel.shape).astype("float32") * 0.1)
    head.bias.assign(rng.normal(size=head.bias.shape).astype("float32"))
    exported = classifier.export_to_transformers(tmp_path / "exported")
    reference_class = HEADS[kind][0]
    reloaded, info = reference_class.from_pretrained(exported, output_loading_info=True)
    assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    assert reloaded.config.pad_token_id == classifier.pad_token_id == model.config.pad_token_id
    ids, mask = _padded(rng, [9, 4], 9)
    ours = keras.ops.convert_to_numpy(classifier({"encoder_token_ids": ids, "encoder_padding_mask": mask}))
    _compare(classifier, kind, ours, _reference_logits(reloaded.eval(), ids, mask), mask)
    # And back: the exported folder loads as the same classifier.
    again = HEADS[kind][1].from_preset(str(exported), preprocessor=None)
    assert again.labels == LABELS
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(again.output_dense.kernel), keras.ops.convert_to_numpy(head.kernel)
    )


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


def test_strings_and_images_through_the_preprocessor_match_reference(small_proto, tmp_path, rng):
    from hf_checkpoints import checkpoint_config
    from hf_checkpoints import write_checkpoint

    config = checkpoint_config(num_labels=2)
    model = write_checkpoint(tmp_path, config, small_proto, seed=2, model_class=T5Gemma2ForSequenceClassification)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = T5Gemma2TextClassifier.from_preset(str(tmp_path))
    classifier.preprocessor.sequence_length = 24
    image = rng.integers(0, 255, (20, 30, 3)).astype("uint8")
    samples = [{"text": "A photo <start_of_image> of a cat", "images": image}, {"text": "The quick brown fox"}]
    scores = classifier.predict(samples, verbose=0)
    x = classifier.preprocessor(samples)
    mask = np.asarray(x["encoder_padding_mask"]).astype("int32")
    images = np.asarray(x["images"])
    reference = _reference_logits(model, np.asarray(x["encoder_token_ids"]), mask, images[:1, 0])
    assert_matches_reference(scores, reference)


def test_generation_checkpoint_gets_a_new_head_with_a_log_line(tmp_path, caplog):
    config = tiny_config()
    reference_model(config, seed=1).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="keras_t5gemma"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = T5Gemma2TextClassifier.from_preset(str(tmp_path), num_classes=4, preprocessor=None)
        seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(str(tmp_path), preprocessor=None)
    assert "randomly initialised" in caplog.text
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


# === Training on the bundled demo preset ===


def sorted_digits(count, seed):
    """`(texts, labels)`: digit sequences, half sorted (label 1), half shuffled (label 1 only if sorted)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(count):
        digits = rng.integers(0, 10, rng.integers(3, 7))
        if i % 2:
            digits = np.sort(digits)
        texts.append(" ".join(map(str, digits)))
        labels.append(int(np.all(np.diff(digits) >= 0)))
    return texts, np.array(labels)


@pytest.fixture(scope="module")
def trained():
    """The demo preset fine-tuned to tell sorted digit sequences from unsorted ones."""
    keras.utils.set_random_seed(0)
    classifier = T5Gemma2TextClassifier.from_preset("t5gemma2_tiny_digits", num_classes=2, labels=["no", "yes"])
    classifier.preprocessor.sequence_length = 10
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3))
    texts, labels = sorted_digits(384, seed=0)
    classifier.fit(texts, labels, batch_size=32, epochs=3, verbose=0)
    return classifier


def test_fit_learns_whether_digits_are_sorted(trained):
    texts, labels = sorted_digits(128, seed=1)
    scores = trained.predict(texts, batch_size=32, verbose=0)
    assert scores.shape == (128, 2)
    accuracy = (scores.argmax(-1) == labels).mean()
    assert accuracy >= 0.9, accuracy


def test_keras_file_and_preset_round_trips_keep_the_scores(trained, tmp_path):
    texts = ["1 2 3", "9 1 5 2", "0 0 7 8 9"]
    scores = trained.predict(texts, verbose=0)
    path = tmp_path / "classifier.keras"
    trained.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(texts, verbose=0), scores, atol=1e-6)
    trained.save_to_preset(tmp_path / "preset")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = T5Gemma2TextClassifier.from_preset(str(tmp_path / "preset"))
    assert loaded.labels == ["no", "yes"] and loaded.get_config() == trained.get_config()
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), scores, atol=1e-6)


def test_a_quantized_classifier_reloads_with_its_quantized_head(trained, tmp_path):
    texts = ["1 2 3", "9 1 5 2", "0 0 7 8 9"]
    trained.save_to_preset(tmp_path / "float")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = T5Gemma2TextClassifier.from_preset(str(tmp_path / "float"))
        classifier.quantize("int8")
        assert classifier.output_dense.quantization_mode == "int8"
        scores = classifier.predict(texts, verbose=0)
        classifier.save_to_preset(tmp_path / "int8")
        loaded = T5Gemma2TextClassifier.from_preset(str(tmp_path / "int8"))
    assert loaded.output_dense.quantization_mode == "int8"
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), scores, atol=1e-6)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0, 2]), r"in \[0, 1\] for num_classes=2; got values in \[0, 2\]"),
        (np.array([-1, 0]), r"in \[0, 1\]"),
        (np.array([[0, 1], [1, 0]]), r"shape \(batch,\)"),
        (np.array([0.5, 1.0]), "fractional"),
    ],
    ids=["too_large", "negative", "wrong_shape", "fractional"],
)
def test_bad_labels_get_a_clear_error(trained, labels, message):
    with pytest.raises(ValueError, match=message):
        trained.fit(["1 2 3", "3 2 1"], labels, verbose=0)


def test_lora_fine_tuning_trains_only_the_adapters_and_the_head():
    keras.utils.set_random_seed(1)
    classifier = T5Gemma2TextClassifier.from_preset("t5gemma2_tiny_digits", num_classes=2)
    classifier.preprocessor.sequence_length = 10
    classifier.backbone.enable_lora(rank=4)
    trainable = {weight.path for weight in classifier.trainable_weights}
    # Keras' LoRA freezes kernels; biases (of the vision tower here) stay trainable.
    assert trainable and all(
        "lora" in path or path.startswith("logits/") or path.endswith("/bias") for path in trainable
    )
    frozen = keras.ops.convert_to_numpy(classifier.backbone.token_embedding.table.embeddings)
    classifier.compile(optimizer=keras.optimizers.Adam(3e-3))
    texts, labels = sorted_digits(128, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = classifier.fit(texts, labels, batch_size=32, epochs=2, verbose=0)
    # In-memory samples are shuffled before batching (`T5Gemma2Task.fit`): no Keras warning about `shuffle`.
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]
    assert history.history["loss"][-1] < history.history["loss"][0]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(classifier.backbone.token_embedding.table.embeddings), frozen
    )


def test_token_classifier_learns_to_tag_rises_and_round_trips(tmp_path):
    """Tag each digit 1 when it is larger than the one before it (a per-token task)."""
    rng = np.random.default_rng(3)
    samples = [rng.integers(0, 10, rng.integers(2, 6)) for _ in range(256)]
    words = [[str(d) for d in digits] for digits in samples]
    tags = [[0] + [int(b > a) for a, b in zip(digits, digits[1:])] for digits in samples]
    keras.utils.set_random_seed(3)
    tagger = T5Gemma2TokenClassifier.from_preset("t5gemma2_tiny_digits", num_classes=2)
    tagger.preprocessor.sequence_length = 8
    tagger.compile(optimizer=keras.optimizers.Adam(2e-3))
    tagger.fit(words, tags, batch_size=32, epochs=3, verbose=0)
    scores = tagger.predict_words(words[:64], batch_size=32, verbose=0)
    predicted = np.concatenate([row.argmax(-1) for row in scores])
    accuracy = (predicted == np.concatenate(tags[:64])).mean()
    assert accuracy >= 0.85, accuracy
    with pytest.raises(ValueError, match="2 words but labels of shape"):
        tagger.fit([["1", "2"]], [[0, 1, 1]], verbose=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        tagger.fit([["1", "2"]], [[0, 5]], verbose=0)
    tagger.save_to_preset(tmp_path / "tagger")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = T5Gemma2TokenClassifier.from_preset(str(tmp_path / "tagger"))
    # The same batches as `scores` (another batch shape may round differently on XLA CPU).
    np.testing.assert_allclose(loaded.predict_words(words[:64], batch_size=32, verbose=0)[2], scores[2], atol=1e-6)


@pytest.mark.parametrize("task_class", [T5Gemma2TextClassifier, T5Gemma2TokenClassifier, T5Gemma2Seq2SeqLM])
def test_a_folder_without_tokenizer_files_loads_without_a_preprocessor(task_class, tmp_path):
    backbone = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits").backbone
    backbone.save_to_preset(tmp_path)
    kwargs = {} if task_class is T5Gemma2Seq2SeqLM else {"num_classes": 3}
    task = task_class.from_preset(str(tmp_path), preprocessor=None, **kwargs)
    assert task.preprocessor is None
    ids = np.array([[2, 40, 41, 0]], "int32")
    outputs = task.predict(
        {
            "encoder_token_ids": ids,
            "encoder_padding_mask": (ids != 0).astype("int32"),
            **({} if kwargs else {"decoder_token_ids": ids[:, :2], "decoder_padding_mask": np.ones((1, 2), "int32")}),
        },
        verbose=0,
    )
    assert np.all(np.isfinite(outputs))
