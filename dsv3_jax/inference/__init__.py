"""Serving: latent-cache generation, MTP speculative decoding, expert placement."""
