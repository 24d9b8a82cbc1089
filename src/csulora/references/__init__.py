"""The once-per-model references the corrections read: the safety subspace from the weights
and the activation statistics of the aligned model (docs/design.md §3, §5c, §9)."""
