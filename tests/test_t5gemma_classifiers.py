"""`T5GemmaTextClassifier` and `T5GemmaTokenClassifier`, both forms: parity with `transformers`' heads, loading
and export.

Each reference (`T5GemmaForSequenceClassification`, `...ForTokenClassification`,
on the encoder-decoder and with `is_encoder_decoder=False`) gets random
weights on an unbalanced (encoder wider and deeper), soft-capped tiny config
with a `<pad>` id that is not 0; the classifier loaded from its saved folder
must give its logits, and its export must give back every tensor bit for bit.
"""

import json
import warnings

import keras
import numpy as np
import pytest
import torch
from conftest import assert_matches_reference
from hf_checkpoints import T5GEMMA_DECODER
from hf_checkpoints import T5GEMMA_ENCODER
from hf_checkpoints import randomised
from safetensors.numpy import load_file
from transformers import T5GemmaConfig
from transformers import T5GemmaEncoderModel
from transformers import T5GemmaForSequenceClassification
from transformers import T5GemmaForTokenClassification

from keras_t5gemma import T5GemmaBackbone
from keras_t5gemma import T5GemmaSeq2SeqLM
from keras_t5gemma import T5GemmaTextClassifier
from keras_t5gemma import T5GemmaTokenClassifier
from keras_t5gemma.cli import main
from keras_t5gemma.conversion.t5gemma_config import backbone_from_t5gemma_config
from keras_t5gemma.conversion.t5gemma_config import load_t5gemma_weights

LABELS = ["negative", "neutral", "positive"]
PAD = 5
HEADS = {
    "sequence": (T5GemmaForSequenceClassification, T5GemmaTextClassifier),
    "token": (T5GemmaForTokenClassification, T5GemmaTokenClassifier),
}


def reference_config(encoder_decoder=True, **top):
    return T5GemmaConfig(
        encoder={**T5GEMMA_ENCODER, "pad_token_id": PAD},
        decoder={**T5GEMMA_DECODER, "pad_token_id": PAD},
        is_encoder_decoder=encoder_decoder,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        **top,
    )


@pytest.fixture(scope="module", params=[(kind, form) for kind in HEADS for form in ("encoder_decoder", "encoder")])
def checkpoint(request, tmp_path_factory, small_proto):
    """A Hugging Face classification checkpoint folder, its reference and the classifier (loaded without the
    tokenizer files)."""
    kind, form = request.param
    reference_class, task_class = HEADS[kind]
    config = reference_config(encoder_decoder=form == "encoder_decoder")
    config._attn_implementation = "eager"
    model = randomised(reference_class(config), seed=11)
    folder = tmp_path_factory.mktemp(f"{kind}_{form}")
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(small_proto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = task_class.from_preset(str(folder), preprocessor=None)
    return model, classifier, kind, form, folder


def padded(rng, lengths, length, left=False):
    ids = np.full((len(lengths), length), PAD, "int32")
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(length - n, length) if left else slice(0, n)
        ids[row, span] = rng.integers(6, T5GEMMA_ENCODER["vocab_size"], n)
        ids[row, span.start] = 2  # <bos>
        mask[row, span] = 1
    return ids, mask


def reference_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).logits.numpy()


def logits(classifier, ids, mask):
    return keras.ops.convert_to_numpy(classifier({"encoder_token_ids": ids, "encoder_padding_mask": mask}))


def compare(kind, ours, reference, mask):
    if kind == "token":
        # Padding positions are free; the reference scores them, but nothing reads them.
        assert_matches_reference(ours, reference, np.repeat(mask[..., None], reference.shape[-1], -1))
    else:
        assert_matches_reference(ours, reference)


def test_the_form_head_and_labels_come_from_the_checkpoint(checkpoint):
    model, classifier, _, form, _ = checkpoint
    assert classifier.num_classes == 3 and classifier.labels == LABELS
    assert classifier.pad_token_id == PAD
    # The encoder-only form builds no decoder at all.
    assert (classifier.backbone.decoder is None) == (form == "encoder")
    assert (classifier.backbone.token_embedding is None) == (form == "encoder")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(classifier.output_dense.bias), model.score.out_proj.bias.detach().numpy()
    )


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_padded_batch_matches_reference(checkpoint, rng, left):
    model, classifier, kind, _, _ = checkpoint
    ids, mask = padded(rng, [9, 5, 2, 9], 9, left=left)
    compare(kind, logits(classifier, ids, mask), reference_logits(model, ids, mask), mask)


def test_the_generation_task_loads_the_full_form_and_refuses_the_encoder_only_one(checkpoint):
    _, _, _, form, folder = checkpoint
    if form == "encoder":
        with pytest.raises(ValueError, match="encoder alone .* needs the decoder"):
            T5GemmaSeq2SeqLM.from_preset(str(folder), preprocessor=None)
    else:
        # The head's tensors are left aside; the encoder-decoder loads.
        assert T5GemmaSeq2SeqLM.from_preset(str(folder), preprocessor=None).backbone.decoder is not None


def test_export_gives_back_every_tensor_bit_for_bit(checkpoint, tmp_path, rng):
    model, classifier, kind, form, folder = checkpoint
    exported = classifier.export_to_transformers(tmp_path / "exported")
    assert load_file(exported / "model.safetensors").keys() == load_file(folder / "model.safetensors").keys()
    for key, value in load_file(folder / "model.safetensors").items():
        np.testing.assert_array_equal(load_file(exported / "model.safetensors")[key], value, err_msg=key)
    config = json.loads((exported / "config.json").read_text())
    assert config["is_encoder_decoder"] == (form == "encoder_decoder")
    reloaded, info = HEADS[kind][0].from_pretrained(exported, output_loading_info=True)
    assert not any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.id2label == dict(enumerate(LABELS)) and reloaded.config.pad_token_id == PAD
    ids, mask = padded(rng, [7, 3], 7)
    compare(kind, logits(classifier, ids, mask), reference_logits(reloaded.eval(), ids, mask), mask)


def test_encoder_only_form_from_a_generation_checkpoint_reads_no_decoder(tmp_path, rng):
    """`encoder_only=True` on a full checkpoint: a new head over the reference encoder's states."""
    config = reference_config()
    config._attn_implementation = "eager"
    full = randomised(T5GemmaForSequenceClassification(config), seed=3)
    full.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = T5GemmaTokenClassifier.from_preset(
            str(tmp_path), num_classes=2, preprocessor=None, encoder_only=True
        )
    assert classifier.backbone.decoder is None
    encoder_config = reference_config(encoder_decoder=False)
    encoder_config._attn_implementation = "eager"
    encoder = T5GemmaEncoderModel(encoder_config).eval()
    encoder.encoder.load_state_dict(full.model.encoder.state_dict())
    ids, mask = padded(rng, [8, 4], 8)
    with torch.no_grad():
        states = encoder(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).last_hidden_state
    head = classifier.output_dense
    reference = states.numpy() @ keras.ops.convert_to_numpy(head.kernel) + keras.ops.convert_to_numpy(head.bias)
    compare("token", logits(classifier, ids, mask), reference, mask)
    # Only the encoder's tensors are read.
    state = {key: value.numpy() for key, value in full.state_dict().items()}
    read = []
    backbone = backbone_from_t5gemma_config(json.loads((tmp_path / "config.json").read_text()), encoder_only=True)
    load_t5gemma_weights(backbone, state.keys(), lambda key: read.append(key) or state[key])
    assert read and all(key.startswith("model.encoder.") for key in read)
    # A `T5GemmaEncoderModel` folder (keys `encoder.*`) loads as the encoder-only backbone.
    encoder.save_pretrained(tmp_path / "encoder")
    loaded = T5GemmaBackbone.from_preset(str(tmp_path / "encoder"))
    assert loaded.decoder is None
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.encoder.final_norm.scale), state["model.encoder.norm.weight"]
    )


@pytest.mark.parametrize("checkpoint", [("sequence", "encoder")], indirect=True, ids=["sequence_encoder"])
def test_encoder_only_classifier_round_trips_through_a_keras_file(checkpoint, tmp_path, rng):
    _, classifier, _, _, _ = checkpoint
    path = tmp_path / "classifier.keras"
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is T5GemmaTextClassifier and loaded.backbone.decoder is None
    ids, mask = padded(rng, [6, 3], 6)
    np.testing.assert_array_equal(logits(loaded, ids, mask), logits(classifier, ids, mask))


@pytest.mark.parametrize("checkpoint", [("sequence", "encoder")], indirect=True, ids=["sequence_encoder"])
def test_classify_command_picks_the_family_and_gives_the_reference_classes(checkpoint, capsys):
    model, _, _, _, folder = checkpoint
    texts = ["the quick fox", "a slow dog sat down"]
    status = main(["classify", *texts, "--preset", str(folder)])
    out, err = capsys.readouterr()
    assert status == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocessor = T5GemmaTextClassifier.from_preset(str(folder)).preprocessor
    x = preprocessor(texts)
    reference = reference_logits(model, np.asarray(x["encoder_token_ids"]), np.asarray(x["encoder_padding_mask"]))
    probabilities = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
    expected = [f"{text}\t{LABELS[row.argmax()]}\t{row.max():.3f}" for text, row in zip(texts, probabilities)]
    assert out.splitlines() == expected


@pytest.mark.parametrize("checkpoint", [("token", "encoder")], indirect=True, ids=["token_encoder"])
def test_fine_tune_classify_tokens_on_a_first_family_checkpoint(checkpoint, tmp_path, capsys):
    folder = checkpoint[-1]
    records = [{"input": "the fox sat", "labels": [0, 1, 0]}, {"input": "a dog", "labels": [1, 0]}] * 4
    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / "tagger"
    argv = ["fine-tune", data, "--task", "classify-tokens", "--preset", folder, "--output", output]
    status = main([str(arg) for arg in [*argv, "--epochs", "1", "--batch-size", "8", "--encoder-length", "8"]])
    _, err = capsys.readouterr()
    assert status == 0, err
    tagger = T5GemmaTokenClassifier.from_preset(str(output))
    # The encoder-only checkpoint fine-tunes as an encoder-only tagger.
    assert type(tagger) is T5GemmaTokenClassifier and tagger.backbone.decoder is None
    assert main(["classify", "--tokens", "the dog", "--preset", str(output)]) == 0
    assert capsys.readouterr().out.split() == [
        f"{word}/{row.argmax()}" for word, row in zip(["the", "dog"], tagger.predict_words(["the dog"])[0])
    ]
