"""What makes many small per-layer adapters fast: grouped (vectorized) pieces, a cached module walk,
a flat AdamW, and what a failed ``torch.compile`` says (each falls back to plainer code)."""
