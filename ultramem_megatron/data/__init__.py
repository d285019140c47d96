"""Data: tokenizer, JSON-lines -> Megatron .bin/.idx preparation, GPTDataset loading and batches."""
