"""Plain-torch specifications of each algorithm: the oracle every backend is
tested against, itself tested against torch.optim (or the published paper)."""
