"""Balancing methods as optax transforms over per-task Jacobians (one module per family)."""
