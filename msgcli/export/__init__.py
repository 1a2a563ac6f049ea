"""Trained networks in formats other tools read: ``nir`` (the Neuromorphic Intermediate Representation)."""
