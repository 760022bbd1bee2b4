"""Data components: readers, curation, tokenizer training, packing."""
