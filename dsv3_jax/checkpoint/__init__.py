"""Checkpoints: orbax for training state, safetensors for the Hugging Face layout."""
