"""The adapter on disk: save and load, its schema and errors, integrity (checksums, base digests,
atomic writes), finalize (pruning and packing), and export to PEFT and merged checkpoints."""
