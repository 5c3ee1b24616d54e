"""The Hugging Face Hub: resolving Hub ids to local snapshots, and publishing a merged folder."""
