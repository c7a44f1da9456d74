"""Flax NNX layers of DeepSeek-V3, one concept per file."""
