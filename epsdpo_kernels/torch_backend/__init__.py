"""The torch backend: the same steps as the Triton backend, in plain torch (the CPU path), and a
vocabulary shard's per-token partials on both backends."""
