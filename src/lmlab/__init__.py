"""lmlab."""
