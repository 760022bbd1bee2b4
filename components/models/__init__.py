"""Models: factories (causal LMs built from a config or loaded in Hugging Face format), import and
export (HF, GGUF), chat templates, the one sampler (with the fast Llama path), log-probs and
reward-model scoring."""
