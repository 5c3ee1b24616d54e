"""Other tools' configs as mergekit_lite configs (mergekit's YAML: `merge run` and `merge convert`)."""
