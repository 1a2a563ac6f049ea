"""Training, evaluation, checkpoints and multi-process setup over msgcli.snn and msgcli.data."""
