"""`merge inspect`: the adapters' task vectors compared before merging, exactly from their factors where LoRA
allows, with the sign conflicts TIES would meet counted over the entries it keeps."""
