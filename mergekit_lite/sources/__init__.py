"""Lazy readers of what a merge consumes: the base checkpoint and PEFT adapters."""
