"""The demo checkpoints (Stream and Generative), trained in seconds on synthetic corpora: NOT safety models."""
