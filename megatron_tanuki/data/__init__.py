"""Data: the Tanuki tokenizer, text sources, batching (sits below models/ and train/)."""
