"""Data components: record formats, curation, tokenizer training, packing, SFT data and preference pairs."""
