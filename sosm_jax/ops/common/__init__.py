"""What the linear-attention ops share: chunk layout and dtype helpers, the implementation names,
the XLA chunk-state recurrence, and the Pallas helpers."""
