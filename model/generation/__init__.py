"""The decode loop that turns logits into token ids: ``generate`` (the loop, its config and
events), ``kv_cache``, ``sampling``, ``stats``, and ``scheduler`` (continuous batching of many
requests over one cache). Takes the model as an argument; never imports the architecture."""
