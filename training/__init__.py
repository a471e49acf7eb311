"""Training module: text -> tokenizer -> CHIAR/baseline checkpoints (python -m training)."""
