"""I/O at the edges: checkpoints, PEFT adapters, subspace caches, atomic output."""
