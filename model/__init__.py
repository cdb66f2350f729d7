"""tickcast's model: the GRU, the shared window -> tensor features, data, training,
evaluation, checkpoints and the retrain job. Never imports ``daemon``."""
