"""Pure tensor math: factored low-rank products, activation Grams and the calibrated solve, the
safety subspace SVD, and the per-module geometry of an update (docs/design.md §2, §3, §5, §5c, §9)."""
