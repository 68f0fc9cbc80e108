"""Generation: KV-cache decoding and sampling, a completion of a prompt, a multi-turn conversation."""
