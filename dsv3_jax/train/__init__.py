"""Training: losses, aux-loss-free balancing, the optimizer, the jitted step and the loop."""
