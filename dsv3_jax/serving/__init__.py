"""Serving-time machinery: redundant experts and their load balancing (EPLB)."""
