"""msgsnn: spiking neural networks trained with Masked Surrogate Gradients and TWO."""

__version__ = "0.1.0"
