"""Judging a model: held-out loss, generation with the training template, scorers, the forgetting meter, interactive chat, and the run report."""
