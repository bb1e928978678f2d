"""The language-modelling loss over the vocabulary in chunks of tokens (JAX), for `fit`.

With a 262,144-piece vocabulary the logits dominate a fine-tuning step's
memory: `(B, T, V)` float32 is 268 MB at batch 4 x 64 decoder tokens, and the
plain path keeps that and the softmax of it for the backward pass. Here the
tied head runs on chunks of decoder states; each chunk's cross-entropy and
its gradients (to the states and to the table) are computed together in the
forward pass, so the backward pass keeps only `(B * T, D)` state gradients and
the table's gradient, and no `(B * T, V)` array is needed unless a metric reads
the logits (then they are assembled once, as `y_pred`, for the metrics only).
The arithmetic is the plain path's: the same logits (the embedding's own
`logits` method, soft-capping included), a float32 log-softmax, and Keras'
`"sum_over_batch_size"` reduction, or `"mean_with_sample_weight"` (the mean
over target tokens, which packed and padded batches of the same examples
share; see `training/packing.py`).
"""

import keras
from keras import ops

# Logits of about this many float32 values (128 MiB) are live at once.
CHUNK_ELEMENTS = 2**25


def default_chunk_tokens(vocabulary_size):
    """Rows of decoder states per chunk: about `CHUNK_ELEMENTS` logits."""
    return max(1, CHUNK_ELEMENTS // vocabulary_size)


def chunked_cross_entropy(token_embedding, table_values, hidden, labels, weights, chunk_tokens):
    """Sparse cross-entropy of `token_embedding.logits(hidden)`, chunk by chunk (JAX only).

    Args:
        token_embedding: the layer whose `logits(hidden)` gives `(..., V)`
            logits; its variables are `token_embedding.table.variables`.
        table_values: the current values of those variables (the
            differentiable inputs the table's gradient goes to).
        hidden: `(N, D)` decoder states.
        labels: int `(N,)`.
        weights: float `(N,)` per-token weights.
        chunk_tokens: rows per chunk.

    Returns:
        `(weighted_sum, logits)`: the float32 sum over tokens of
        `weight * cross_entropy`, and the `(N, V)` logits (not differentiated;
        for metrics).
    """
    import jax
    import jax.numpy as jnp

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
        def chunk(table_gradients, inputs):
            states, chunk_labels, chunk_weights = inputs
            logits, pullback = jax.vjp(logits_of, states, values)
            log_probabilities = jax.nn.log_softmax(logits.astype("float32"), axis=-1)
            label_log_probability = jnp.take_along_axis(log_probabilities, chunk_labels[:, None], axis=-1)[:, 0]
            loss = -jnp.sum(chunk_weights * label_log_probability)
            # d loss / d logits = weight * (softmax - one_hot(label)).
            logits_gradient = jnp.exp(log_probabilities)
            logits_gradient = logits_gradient.at[jnp.arange(chunk_tokens), chunk_labels].add(-1.0)
            logits_gradient = (logits_gradient * chunk_weights[:, None]).astype(logits.dtype)
            states_gradient, values_gradient = pullback(logits_gradient)
            table_gradients = jax.tree.map(jnp.add, table_gradients, values_gradient)
            return table_gradients, (loss, states_gradient, logits)

        zeros = jax.tree.map(jnp.zeros_like, values)
        inputs = (as_chunks(hidden), as_chunks(labels), as_chunks(weights))
        table_gradients, (losses, states_gradients, logits) = jax.lax.scan(chunk, zeros, inputs)
        states_gradients = states_gradients.reshape(-1, hidden.shape[-1])[:rows]
        logits = logits.reshape(-1, logits.shape[-1])[:rows]
        return (jnp.sum(losses), logits), (states_gradients, table_gradients)

    @jax.custom_vjp
    def weighted_cross_entropy(hidden, values):
        return forward_and_gradients(hidden, values)[0]

    def backward(gradients, cotangents):
        states_gradients, table_gradients = gradients
        # Only the loss is differentiated; the logits are for metrics.
        scale = cotangents[0]
        return (
            (states_gradients * scale).astype(hidden.dtype),
            jax.tree.map(lambda g, v: (g * scale).astype(v.dtype), table_gradients, list(table_values)),
        )

    weighted_cross_entropy.defvjp(forward_and_gradients, backward)
    loss, logits = weighted_cross_entropy(hidden, list(table_values))
    return loss, jax.lax.stop_gradient(logits)


class ChunkedLossMixin:
    """`fit` on JAX computes the LM loss in chunks of tokens (`chunked_cross_entropy`).

    Applies when the compiled loss is Keras' default
    `SparseCategoricalCrossentropy(from_logits=True)` (`compile()`'s "auto",
    no `ignore_class`, the default reduction or `"mean_with_sample_weight"`)
    and the table is not
    quantized; anything else (another loss, another backend) runs the plain
    path, which computes the same value. Metrics get the logits as usual.

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
            weighted_sum, logits = chunked_cross_entropy(
                embedding,
                [values[id(variable)] for variable in embedding.table.variables],
                ops.reshape(hidden, (batch * length, dim)),
                ops.reshape(ops.cast(y, "int32"), (batch * length,)),
                ops.reshape(ops.cast(weights, "float32"), (batch * length,)),
                self.loss_chunk_tokens or default_chunk_tokens(embedding.vocabulary_size),
            )
            if self.loss.reduction == "mean_with_sample_weight" and sample_weight is not None:
                # Over the target tokens: the same for packed and padded rows.
                loss = ops.divide_no_nan(weighted_sum, ops.sum(ops.cast(weights, "float32")))
            else:
                # Keras' "sum_over_batch_size": the weighted sum over every position.
                loss = weighted_sum / (batch * length)
            for extra in self.losses:
                loss = loss + self._aggregate_additional_loss(extra)
        y_pred = ops.reshape(logits, (batch, length, -1))
        non_trainable_variables = [
            scope.get_current_value(variable) if scope.get_current_value(variable) is not None else value
            for variable, value in zip(self.non_trainable_variables, non_trainable_variables)
        ]
        unscaled_loss = loss
        if training and self.optimizer is not None:
            with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, optimizer_variables))):
                loss = self.optimizer.scale_loss(loss)
        return loss, (unscaled_loss, y_pred, non_trainable_variables, metrics_variables)
