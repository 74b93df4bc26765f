"""The central service: fleet state, model catalog, compression, variant choice and rollouts."""
