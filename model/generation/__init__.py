"""The decode loop that turns logits into token ids: ``generate`` (the loop, its config and
events), ``kv_cache``, ``sampling`` and ``stats``. Takes the model as an argument; never imports
the architecture."""
