"""Training, evaluation, checkpoints and multi-process setup over msgsnn.snn and msgsnn.data."""
