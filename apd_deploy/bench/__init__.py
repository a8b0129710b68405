"""`apd-deploy bench`: throughput, accuracy and where each step's time goes, side by side with a
PyTorch-eager version of the same loop."""
