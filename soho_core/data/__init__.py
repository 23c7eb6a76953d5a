"""Data: the synthetic world, shards, tokenizer, masking and batching."""
