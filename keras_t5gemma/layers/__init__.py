"""Building blocks: attention, masks, RoPE, norms, feed-forward, embeddings, stacks."""
