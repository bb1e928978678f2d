"""`chunked_cross_entropy` against the whole-logits loss, and the passes over the table's gradient in XLA's plan."""

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_t5gemma.layers.token_embedding import TokenEmbedding
from keras_t5gemma.models.chunked_loss import chunked_cross_entropy

VOCABULARY, WIDTH, ROWS = 1000, 12, 23
TABLE_SHAPE = f"f32[{VOCABULARY},{WIDTH}]"


@pytest.fixture(scope="module")
def head():
    keras.utils.set_random_seed(0)
    embedding = TokenEmbedding(VOCABULARY, WIDTH, eoi_token_id=None, logit_soft_cap=30.0)
    embedding.build()
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(ROWS, WIDTH)).astype("float32"))
    labels = jnp.asarray(rng.integers(0, VOCABULARY, ROWS).astype("int32"))
    # Some tokens weigh nothing (padding), others more; normalised as `fit` does for a token mean.
    weights = (rng.uniform(size=ROWS) > 0.3) * np.linspace(0.5, 2.0, ROWS)
    weights = jnp.asarray((weights / weights.sum()).astype("float32"))
    return embedding, hidden, labels, weights, [v.value for v in embedding.table.variables]


def _whole_logits(embedding, hidden, values):
    with keras.StatelessScope(state_mapping=list(zip(embedding.table.variables, values))):
        return embedding.logits(hidden)


@pytest.mark.parametrize("chunk_tokens", [5, ROWS])
def test_loss_gradients_and_predictions_equal_the_whole_logits(head, chunk_tokens):
    embedding, hidden, labels, weights, values = head

    def whole(states, values):
        log_probabilities = jax.nn.log_softmax(_whole_logits(embedding, states, values), axis=-1)
        return -jnp.sum(weights * log_probabilities[jnp.arange(ROWS), labels])

    def chunked(states, values, predictions="ids"):
        return chunked_cross_entropy(embedding, values, states, labels, weights, chunk_tokens, predictions)[0]

    # A cotangent other than 1 (a scaled loss) still scales both gradients.
    expected_loss, expected = jax.jit(jax.value_and_grad(lambda *a: 3 * whole(*a), argnums=(0, 1)))(hidden, values)
    loss, gradients = jax.jit(jax.value_and_grad(lambda *a: 3 * chunked(*a), argnums=(0, 1)))(hidden, values)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(gradients), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))

    logits = _whole_logits(embedding, hidden, values)
    ids = chunked_cross_entropy(embedding, values, hidden, labels, weights, chunk_tokens, "ids")[1]
    np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))
    chunk_logits = chunked_cross_entropy(embedding, values, hidden, labels, weights, chunk_tokens, "logits")[1]
    np.testing.assert_allclose(chunk_logits, logits, rtol=1e-6, atol=1e-6 * float(np.abs(logits).max()))
    with pytest.raises(ValueError, match="predictions"):
        chunked_cross_entropy(embedding, values, hidden, labels, weights, chunk_tokens, "probabilities")


def _table_sized_ops(compiled_text):
    """Opcodes of the ops that write a `(V, D)` array, outside fusions' bodies (each runs as one pass)."""
    opcodes, in_fusion = [], False
    for line in compiled_text.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if header:
            in_fusion = "computation" in header.group(1)
            continue
        found = re.match(r"\s*(?:ROOT )?%\S+ = " + re.escape(TABLE_SHAPE) + r"\S* (\S+?)\(", line)
        if found and not in_fusion and found.group(1) not in ("parameter", "get-tuple-element", "bitcast"):
            fused = re.search(r"calls=%(\w+?)_computation", line)
            opcodes.append(f"{found.group(1)} {fused.group(1)}" if fused else found.group(1))
    return sorted(opcodes)


@pytest.mark.parametrize(
    "chunk_tokens, expected", [(5, ["dot", "fusion wrapped_add", "fusion wrapped_broadcast"]), (ROWS, ["dot"])]
)
def test_table_gradient_has_no_scaling_pass(head, chunk_tokens, expected):
    # The carry's zeroing, the loop body's product and its in-place sum (one
    # chunk: the product alone), and no pass after the loop (the
    # normalisation is in the weights).
    embedding, hidden, labels, weights, values = head

    def loss(states, values):
        return chunked_cross_entropy(embedding, values, states, labels, weights, chunk_tokens, "ids")[0]

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, values).compile()
    assert _table_sized_ops(compiled.as_text()) == expected
