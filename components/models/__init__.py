"""Model factories: causal LMs built from a config, saved and loaded in Hugging Face format."""
