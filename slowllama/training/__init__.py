"""The training loop and what surrounds it: the optimizer step, checkpoints and exact resume,
torchrun, the run lock, DPO's objective, and the reports (plots, TensorBoard)."""
