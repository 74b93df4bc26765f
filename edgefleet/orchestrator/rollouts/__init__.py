"""Gated rollouts of a model version in waves, and reconciliation of desired with reported state."""
