"""One correction pipeline for every update (docs/design.md §9): LoRA adapters and full
checkpoints are read, audited, corrected and written by the same streamed loop."""
