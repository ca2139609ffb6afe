"""Training: source discovery, tokenizer training, token shards, and the training loop (single
process, or data-parallel under torchrun with DDP or FSDP2)."""
