"""Machinery that makes many small per-layer adapters fast: grouped (vectorized) pieces, a cached
module walk, a flat AdamW, and what a failed ``torch.compile`` says. It changes no result."""
