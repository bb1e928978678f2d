"""Fine-tuning: the vision tower frozen by default (and trainable on request),
weights without a gradient left bit-identical whatever the optimizer, the
chunked loss against the plain one, and `fit`'s shuffling."""

import warnings

import jax
import keras
import numpy as np
import pytest

from keras_t5gemma.layers.vision import T5Gemma2VisionEncoder
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_embedder import T5Gemma2Embedder
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from keras_t5gemma.models.t5gemma2.t5gemma2_text_classifier import T5Gemma2TextClassifier
from keras_t5gemma.models.t5gemma2.t5gemma2_token_classifier import T5Gemma2TokenClassifier

VOCABULARY = 40
EOI, IMAGE, BOI = 37, 38, 39
MM_TOKENS = 4

OPTIMIZERS = {
    "adamw_weight_decay": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "sgd_momentum_weight_decay": lambda: keras.optimizers.SGD(1e-2, momentum=0.9, weight_decay=0.1),
    "adafactor": lambda: keras.optimizers.Adafactor(1e-2, weight_decay=0.1),
}


def _vision_backbone(**kwargs):
    vision = T5Gemma2VisionEncoder(
        image_size=8,
        patch_size=2,
        hidden_dim=8,
        intermediate_dim=16,
        num_layers=1,
        num_heads=2,
        output_dim=16,
        mm_tokens_per_image=MM_TOKENS,
    )
    return T5Gemma2Backbone(
        vocabulary_size=VOCABULARY,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_encoder_layers=1,
        num_decoder_layers=1,
        sliding_window=8,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
        vision_encoder=vision,
        **kwargs,
    )


def _text_batch(rng, batch=4, length=6):
    """Token-id inputs without image tokens, and next-token targets."""
    ids = rng.integers(1, 30, (batch, length)).astype("int32")
    x = {
        "encoder_token_ids": ids,
        "encoder_padding_mask": np.ones_like(ids),
        "decoder_token_ids": ids[:, ::-1].copy(),
        "decoder_padding_mask": np.ones_like(ids),
    }
    return x, np.roll(x["decoder_token_ids"], -1, axis=1)


def _image_batch(rng, batch=2):
    """One image per sample with its placeholders."""
    x, y = _text_batch(rng, batch)
    block = [BOI] + [IMAGE] * MM_TOKENS + [EOI]
    ids = np.concatenate([x["encoder_token_ids"], np.tile(block, (batch, 1))], axis=1).astype("int32")
    x["encoder_token_ids"], x["encoder_padding_mask"] = ids, np.ones_like(ids)
    x["images"] = rng.uniform(-1, 1, (batch, 1, 8, 8, 3)).astype("float32")
    return x, y


def _weights(model):
    return {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}


@pytest.fixture(scope="module")
def text_batch():
    return _text_batch(np.random.default_rng(5))


@pytest.fixture(scope="module")
def zero_gradient_positions(text_batch):
    """Positions in `weights` of those whose gradient on the text batch is zero, found with every weight free."""
    model = T5Gemma2Seq2SeqLM(_vision_backbone())
    x, y = text_batch
    x = model.backbone.with_default_images(x)

    def loss(values):
        with keras.StatelessScope(state_mapping=list(zip(model.weights, values))):
            return model.compute_loss(x, y, model(x))

    gradients = jax.jit(jax.grad(loss))([w.value for w in model.weights])
    return {i for i, g in enumerate(gradients) if not np.any(np.asarray(g))}


@pytest.mark.parametrize(
    "optimizer, lora",
    [
        ("adamw_weight_decay", False),
        ("adamw_weight_decay", True),
        ("sgd_momentum_weight_decay", False),
        ("adafactor", True),
    ],
)
def test_text_only_fit_leaves_weights_without_a_gradient_bit_identical(
    optimizer, lora, text_batch, zero_gradient_positions
):
    keras.utils.set_random_seed(0)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(_vision_backbone())
    without_gradient = {seq_2_seq_lm.weights[i].path for i in zero_gradient_positions}
    vision = {w.path for w in seq_2_seq_lm.backbone.vision_encoder.weights}
    # The vision tower and the end-of-image vector get none; the text weights all do.
    assert without_gradient == vision | {"token_embedding/eoi_embedding"}
    if lora:
        # `enable_lora` makes the tower's attention layers trainable again; `compile` re-freezes it.
        seq_2_seq_lm.backbone.enable_lora(2)
    seq_2_seq_lm.compile(optimizer=OPTIMIZERS[optimizer]())
    trainable = {w.path for w in seq_2_seq_lm.trainable_weights}
    assert trainable and not trainable & without_gradient
    before = _weights(seq_2_seq_lm)
    seq_2_seq_lm.fit(*text_batch, batch_size=2, epochs=1, verbose=0)
    after = _weights(seq_2_seq_lm)
    for path in without_gradient:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert all(not np.array_equal(after[path], before[path]) for path in trainable if "lora_kernel_a" not in path)


def test_train_vision_tower_trains_it_on_image_data(rng):
    keras.utils.set_random_seed(0)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM(_vision_backbone(), train_vision_tower=True)
    vision = seq_2_seq_lm.backbone.vision_encoder
    assert {w.path for w in vision.weights} <= {w.path for w in seq_2_seq_lm.trainable_weights}
    seq_2_seq_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y = _image_batch(rng)
    before = _weights(seq_2_seq_lm)
    seq_2_seq_lm.fit(x, y, batch_size=2, epochs=1, verbose=0)
    after = _weights(seq_2_seq_lm)
    for path in [w.path for w in vision.weights] + ["token_embedding/eoi_embedding"]:
        assert not np.array_equal(after[path], before[path]), path


def test_train_vision_tower_round_trips_and_rejects_non_bools():
    backbone = _vision_backbone(encoder_only=True)
    embedder = T5Gemma2Embedder(backbone, train_vision_tower=True)
    assert T5Gemma2Embedder.from_config(embedder.get_config()).train_vision_tower is True
    assert T5Gemma2Embedder(backbone).train_vision_tower is False
    assert not backbone.vision_encoder.trainable
    with pytest.raises(ValueError, match="train_vision_tower"):
        embedder.train_vision_tower = "yes"


@pytest.mark.parametrize("classifier_class", [T5Gemma2TextClassifier, T5Gemma2TokenClassifier])
def test_classifiers_freeze_the_vision_tower_by_default(classifier_class, text_batch):
    keras.utils.set_random_seed(0)
    classifier = classifier_class(_vision_backbone(), num_classes=3)
    frozen = {w.path for w in classifier.backbone.vision_encoder.weights} | {"token_embedding/eoi_embedding"}
    assert not frozen & {w.path for w in classifier.trainable_weights}
    classifier.compile(optimizer=OPTIMIZERS["adamw_weight_decay"]())
    x = {key: text_batch[0][key] for key in ("encoder_token_ids", "encoder_padding_mask")}
    labels = np.arange(x["encoder_token_ids"].size).reshape(x["encoder_token_ids"].shape) % 3
    before = _weights(classifier)
    classifier.fit(x, labels if classifier.per_token else labels[:, 0], batch_size=2, epochs=1, verbose=0)
    after = _weights(classifier)
    for path in frozen:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert not np.array_equal(after["logits/kernel"], before["logits/kernel"])

    restored = classifier_class.from_config({**classifier.get_config(), "train_vision_tower": True})
    assert restored.train_vision_tower is True
    assert frozen <= {w.path for w in restored.trainable_weights}


def _loss_gradients_and_logits(model, x, y, sample_weight, chunk_tokens):
    """The training loss, its gradients and the logits, on the chunked path (or the plain one for `None`)."""
    model.chunked_loss, model.loss_chunk_tokens = chunk_tokens is not None, chunk_tokens
    frozen, metrics, optimizer = (
        [v.value for v in variables]
        for variables in (model.non_trainable_variables, model.metrics_variables, model.optimizer.variables)
    )

    def loss(trainable):
        return model.compute_loss_and_updates(
            trainable, frozen, metrics, x, y, sample_weight, training=True, optimizer_variables=optimizer
        )

    (value, (_, logits, _, _)), gradients = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        [v.value for v in model.trainable_variables]
    )
    return value, gradients, logits


def test_chunked_loss_equals_the_plain_loss_and_gradients(text_batch):
    keras.utils.set_random_seed(0)
    model = T5Gemma2Seq2SeqLM(_vision_backbone())
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.optimizer.build(model.trainable_variables)
    x, y = text_batch
    # Padding positions carry no weight, as the preprocessor's masks give them; others weigh more.
    weights = (np.random.default_rng(2).uniform(size=y.shape) > 0.3) * np.linspace(0.5, 2.0, y.shape[1])
    weights = weights.astype("float32")
    assert model._runs_chunked_loss(y, weights) and not model._runs_chunked_loss(y, weights[:, 0])
    plain_loss, plain_gradients, plain_logits = _loss_gradients_and_logits(model, x, y, weights, None)
    # 24 tokens: chunks of 5 (the last one padded), and one chunk for all.
    for chunk_tokens in (5, 64):
        loss, gradients, logits = _loss_gradients_and_logits(model, x, y, weights, chunk_tokens)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
        np.testing.assert_array_equal(logits, plain_logits)
        for variable, gradient, plain in zip(model.trainable_variables, gradients, plain_gradients):
            scale = float(np.max(np.abs(plain)))
            np.testing.assert_allclose(gradient, plain, rtol=1e-5, atol=1e-6 * scale, err_msg=variable.path)


@pytest.mark.parametrize("top_k", [False, True])
def test_chunked_loss_gives_the_accuracy_metric_predicted_ids_and_the_plain_values(text_batch, top_k):
    """`evaluate`'s loss and metrics on the chunked path equal the plain path's; the accuracy alone reads ids."""
    keras.utils.set_random_seed(0)
    model = T5Gemma2Seq2SeqLM(_vision_backbone())
    x, _ = text_batch
    # Two targets in three are the model's own argmax: an accuracy well away from 0 and 1.
    predicted = np.argmax(keras.ops.convert_to_numpy(model(model.backbone.with_default_images(x))), axis=-1)
    y = np.where(np.arange(predicted.size).reshape(predicted.shape) % 3, predicted, (predicted + 1) % VOCABULARY)
    weights = ((np.random.default_rng(2).uniform(size=y.shape) > 0.3) * np.linspace(0.5, 2.0, y.shape[1])).astype(
        "float32"
    )
    metrics = ["sparse_categorical_accuracy"] + [keras.metrics.SparseTopKCategoricalAccuracy(k=2)] * top_k
    results = {}
    for chunked in (False, True):
        # `compile` drops the compiled test function, so each path is traced.
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), weighted_metrics=metrics)
        model.chunked_loss = chunked
        results[chunked] = model.evaluate(x, y, sample_weight=weights, batch_size=4, verbose=0, return_dict=True)
    assert results[False].keys() == results[True].keys() and 0.2 < results[True]["sparse_categorical_accuracy"] < 0.8
    for name, value in results[True].items():
        np.testing.assert_allclose(value, results[False][name], rtol=1e-6, err_msg=name)

    def y_pred(trainable):
        state = [[v.value for v in variables] for variables in (model.non_trainable_variables, model.metrics_variables)]
        return model.compute_loss_and_updates(trainable, *state, x, y, weights)[1][1]

    # [batch, decoder_length] ids for the accuracy alone; logits when another metric reads them.
    shape = jax.eval_shape(y_pred, [v.value for v in model.trainable_variables]).shape
    assert shape == (y.shape + (VOCABULARY,) if top_k else y.shape)


def test_fit_compiles_one_train_step_donates_the_state_and_reports_accuracy(text_batch):
    keras.utils.set_random_seed(0)
    model = T5Gemma2Seq2SeqLM(_vision_backbone())
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    traces = []
    train_step = model.train_step
    # Under `jax.jit` the Python `train_step` runs only when the step is traced.
    model.train_step = lambda *args: traces.append(1) or train_step(*args)
    table = model.backbone.token_embedding.table.embeddings.value
    history = model.fit(*text_batch, batch_size=2, epochs=2, verbose=0)
    assert len(traces) == 1
    # Keras' JAX trainer donates the training state: the table's buffer before training is gone.
    assert table.is_deleted()
    assert set(history.history) == {"loss", "sparse_categorical_accuracy"}
    assert np.all(np.isfinite(history.history["loss"]))


def test_mixed_bfloat16_fit_trains(text_batch):
    keras.utils.set_random_seed(0)
    model = T5Gemma2Seq2SeqLM(_vision_backbone(dtype="mixed_bfloat16"))
    assert model.backbone.compute_dtype == "bfloat16"
    assert {w.dtype for w in model.trainable_weights} == {"float32"}
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(*text_batch, batch_size=4, epochs=4, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_fit_on_strings_shuffles_each_epoch_without_warning():
    keras.utils.set_random_seed(0)
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset("t5gemma2_tiny_digits")
    seq_2_seq_lm.compile(optimizer=keras.optimizers.SGD(0.1))
    x = {
        "encoder_text": [f"reverse: {i} {i + 1}" for i in range(6)],
        "decoder_text": [f"{i + 1} {i}" for i in range(6)],
    }
    start = [keras.ops.convert_to_numpy(w) for w in seq_2_seq_lm.weights]

    def fit(**kwargs):
        seq_2_seq_lm.set_weights(start)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seq_2_seq_lm.fit(x, batch_size=1, epochs=1, verbose=0, **kwargs)
        assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]
        return [keras.ops.convert_to_numpy(w) for w in seq_2_seq_lm.weights]

    in_order = fit(shuffle=False)
    # With batch 1 the order of the samples shows in the weights.
    assert all(np.array_equal(a, b) for a, b in zip(in_order, fit(shuffle=False)))
    assert not all(np.array_equal(a, b) for a, b in zip(in_order, fit()))
