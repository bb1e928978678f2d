"""The language-modelling loss over the vocabulary in chunks of tokens (JAX), for `fit`.

With a 262,144-piece vocabulary the logits dominate a fine-tuning step's
memory: `(B, T, V)` float32 is 268 MB at batch 4 x 64 decoder tokens, and the
plain path keeps that and the softmax of it for the backward pass. Here the
tied head runs on chunks of decoder states; each chunk's cross-entropy and
its gradients (to the states and to the table) are computed together in the
forward pass, so the backward pass keeps only `(B * T, D)` state gradients and
the table's gradient. No `(B * T, V)` array is kept: the accuracy metric reads
each token's argmax, taken in the chunk loop; only a metric that reads the
logits themselves has them assembled once, as `y_pred`.
The arithmetic is the plain path's: the same logits (the embedding's own
`logits` method, soft-capping included), a float32 log-softmax, and Keras'
`"sum_over_batch_size"` reduction, or `"mean_with_sample_weight"` (the mean
over target tokens, which packed and padded batches of the same examples
share; see `training/packing.py`).

The table's gradient, `(V, D)` (671 MB at 270m), is the loop's carry: each
chunk's product goes into one slot that XLA reuses across chunks and is added
in place, and the reduction's normalisation rides in the per-token weights, so
no scaling pass follows the loop (the loss's cotangent is 1 in `fit`, and XLA
drops the multiplication by it).
"""

import keras
from keras import ops

from keras_t5gemma.models.samplers import first_argmax

# Logits of about this many float32 values (128 MiB) are live at once.
CHUNK_ELEMENTS = 2**25


def default_chunk_tokens(vocabulary_size):
    """Rows of decoder states per chunk: about `CHUNK_ELEMENTS` logits."""
    return max(1, CHUNK_ELEMENTS // vocabulary_size)


def chunked_cross_entropy(token_embedding, table_values, hidden, labels, weights, chunk_tokens, predictions="logits"):
    """Sparse cross-entropy of `token_embedding.logits(hidden)`, chunk by chunk (JAX only).

    Args:
        token_embedding: the layer whose `logits(hidden)` gives `(..., V)`
            logits; its variables are `token_embedding.table.variables`.
        table_values: the current values of those variables (the
            differentiable inputs the table's gradient goes to).
        hidden: `(N, D)` decoder states.
        labels: int `(N,)`.
        weights: float `(N,)` per-token weights, the reduction's
            normalisation included (`1 / N` each for a mean over `N` tokens):
            the gradients are then those of the reduced loss, with no pass
            over them after the loop.
        chunk_tokens: rows per chunk.
        predictions: `"logits"` for the `(N, V)` logits, or `"ids"` for each
            row's argmax `(N,)` (what an accuracy metric reads), taken chunk
            by chunk so that no `(N, V)` array is kept.

    Returns:
        `(loss, predictions)`: the float32 sum over tokens of
        `weight * cross_entropy`, and the predictions (not differentiated;
        for metrics).
    """
    import jax
    import jax.numpy as jnp

    if predictions not in ("logits", "ids"):
        raise ValueError(f'`predictions` must be "logits" or "ids", got {predictions!r}')
    variables = list(token_embedding.table.variables)
    rows = hidden.shape[0]
    chunk_tokens = min(chunk_tokens, rows)
    padding = -rows % chunk_tokens
    chunks = (rows + padding) // chunk_tokens

    def as_chunks(array):
        # Padded rows have weight 0: no loss, no gradient.
        array = jnp.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1))
        return array.reshape(chunks, chunk_tokens, *array.shape[1:])

    def logits_of(states, values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return token_embedding.logits(states)

    def forward_and_gradients(hidden, values):
        def chunk(states, chunk_labels, chunk_weights):
            logits, pullback = jax.vjp(logits_of, states, values)
            log_probabilities = jax.nn.log_softmax(logits.astype("float32"), axis=-1)
            label_log_probability = jnp.take_along_axis(log_probabilities, chunk_labels[:, None], axis=-1)[:, 0]
            loss = -jnp.sum(chunk_weights * label_log_probability)
            # d loss / d logits = weight * (softmax - one_hot(label)).
            logits_gradient = jnp.exp(log_probabilities)
            logits_gradient = logits_gradient.at[jnp.arange(chunk_tokens), chunk_labels].add(-1.0)
            logits_gradient = (logits_gradient * chunk_weights[:, None]).astype(logits.dtype)
            states_gradient, values_gradient = pullback(logits_gradient)
            # The argmax the accuracy metric takes from the logits (the same index, faster on CPU).
            prediction = logits if predictions == "logits" else first_argmax(logits)
            return values_gradient, (loss, states_gradient, prediction)

        def add_chunk(table_gradients, inputs):
            values_gradient, outputs = chunk(*inputs)
            return jax.tree.map(jnp.add, table_gradients, values_gradient), outputs

        inputs = (as_chunks(hidden), as_chunks(labels), as_chunks(weights))
        # A zeroed carry: starting the sum from the first chunk's product
        # instead gave that product a buffer of its own beside the loop's
        # product slot (+511 MiB in XLA's plan of the train step, BENCHMARKS.md).
        zeros = jax.tree.map(jnp.zeros_like, values)
        table_gradients, (losses, states_gradients, outputs) = jax.lax.scan(add_chunk, zeros, inputs)
        states_gradients = states_gradients.reshape(-1, hidden.shape[-1])[:rows]
        outputs = outputs.reshape(rows + padding, *outputs.shape[2:])[:rows]
        return (jnp.sum(losses), outputs), (states_gradients, table_gradients)

    @jax.custom_vjp
    def weighted_cross_entropy(hidden, values):
        return forward_and_gradients(hidden, values)[0]

    def backward(gradients, cotangents):
        states_gradients, table_gradients = gradients
        # Only the loss is differentiated; the predictions are for metrics.
        # With the normalisation in the weights the cotangent is 1 in `fit`,
        # and XLA drops the multiplication (no pass over the table's gradient).
        scale = cotangents[0]
        return (
            (states_gradients * scale).astype(hidden.dtype),
            jax.tree.map(lambda g, v: (g * scale).astype(v.dtype), table_gradients, list(table_values)),
        )

    weighted_cross_entropy.defvjp(forward_and_gradients, backward)
    loss, outputs = weighted_cross_entropy(hidden, list(table_values))
    return loss, jax.lax.stop_gradient(outputs)


class ChunkedLossMixin:
    """`fit` on JAX computes the LM loss in chunks of tokens (`chunked_cross_entropy`).

    Applies when the compiled loss is Keras' default
    `SparseCategoricalCrossentropy(from_logits=True)` (`compile()`'s "auto",
    no `ignore_class`, the default reduction or `"mean_with_sample_weight"`)
    and the table is not
    quantized; anything else (another loss, another backend) runs the plain
    path, which computes the same value. When every compiled metric is a
    `SparseCategoricalAccuracy` (the default), the chunk loop gives the
    predicted ids instead of the logits and `compute_metrics` turns them into
    the same accuracy; other metrics get the logits as usual.

    Attributes:
        chunked_loss: bool, default `True`; `False` runs the plain path.
        loss_chunk_tokens: decoder states per chunk, or `None` for about
            128 MiB of float32 logits per chunk (128 states at 262,144 pieces).
    """

    chunked_loss = True
    loss_chunk_tokens = None

    def _runs_chunked_loss(self, y, sample_weight=None):
        loss = getattr(self, "loss", None)
        return (
            self.chunked_loss
            and keras.config.backend() == "jax"
            and isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
            and loss.from_logits
            and loss.ignore_class is None
            and loss.reduction in ("sum_over_batch_size", "mean_with_sample_weight")
            and self.backbone.token_embedding.table.quantization_mode is None
            and not keras.tree.is_nested(y)
            and len(y.shape) == 2
            and (sample_weight is None or tuple(sample_weight.shape) == tuple(y.shape))
        )

    def _metrics_read_only_predicted_ids(self):
        """Whether every compiled metric reads only each token's argmax (`SparseCategoricalAccuracy`).

        Known once Keras has built the compiled metrics, which `fit` and
        `evaluate` do before their first step; before that, the logits.
        """
        metrics = self._compile_metrics
        return metrics is None or (
            metrics.built and all(type(metric) is keras.metrics.SparseCategoricalAccuracy for metric in metrics.metrics)
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' metrics; predicted ids from the chunk loop count as the accuracy their logits give."""
        if self._runs_chunked_loss(y, sample_weight) and len(y_pred.shape) == len(y.shape):
            # [batch, decoder_length] predicted ids: each token as a two-class
            # prediction (label predicted or not) against the class "predicted"
            # gives the metric the same matches, so the same accuracy.
            predicted = ops.cast(ops.equal(ops.cast(y_pred, "int32"), ops.cast(y, "int32")), "int32")
            y, y_pred = ops.ones_like(predicted), ops.one_hot(predicted, 2)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def compute_loss_and_updates(
        self,
        trainable_variables,
        non_trainable_variables,
        metrics_variables,
        x,
        y,
        sample_weight,
        training=False,
        optimizer_variables=None,
    ):
        """Keras' JAX loss function, with the LM loss computed in chunks where it applies."""
        if not self._runs_chunked_loss(y, sample_weight):
            return super().compute_loss_and_updates(
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
                x,
                y,
                sample_weight,
                training=training,
                optimizer_variables=optimizer_variables,
            )
        mapping = list(zip(self.trainable_variables, trainable_variables))
        mapping += list(zip(self.non_trainable_variables, non_trainable_variables))
        values = {id(variable): value for variable, value in mapping}
        embedding = self.backbone.token_embedding
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            outputs = self.backbone(self._with_default_images(x), training=training)
            # [batch, decoder_length, hidden_dim]
            hidden = outputs["decoder_sequence_output"]
            batch, length, dim = ops.shape(hidden)
            weights = ops.ones((batch, length), "float32") if sample_weight is None else sample_weight
            weights = ops.cast(weights, "float32")
            if self.loss.reduction == "mean_with_sample_weight" and sample_weight is not None:
                # Over the target tokens: the same for packed and padded rows.
                weights = ops.divide_no_nan(weights, ops.sum(weights))
            else:
                # Keras' "sum_over_batch_size": the weighted sum over every position.
                weights = weights / (batch * length)
            predictions = "ids" if self._metrics_read_only_predicted_ids() else "logits"
            loss, y_pred = chunked_cross_entropy(
                embedding,
                [values[id(variable)] for variable in embedding.table.variables],
                ops.reshape(hidden, (batch * length, dim)),
                ops.reshape(ops.cast(y, "int32"), (batch * length,)),
                ops.reshape(weights, (batch * length,)),
                self.loss_chunk_tokens or default_chunk_tokens(embedding.vocabulary_size),
                predictions,
            )
            for extra in self.losses:
                loss = loss + self._aggregate_additional_loss(extra)
        # [batch, decoder_length, vocabulary] logits or [batch, decoder_length] ids
        y_pred = ops.reshape(y_pred, (batch, length, *y_pred.shape[1:]))
        non_trainable_variables = [
            scope.get_current_value(variable) if scope.get_current_value(variable) is not None else value
            for variable, value in zip(self.non_trainable_variables, non_trainable_variables)
        ]
        unscaled_loss = loss
        if training and self.optimizer is not None:
            with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, optimizer_variables))):
                loss = self.optimizer.scale_loss(loss)
        return loss, (unscaled_loss, y_pred, non_trainable_variables, metrics_variables)
