"""What a trained adapter costs and chose: BOPs and bytes, the gate summary, plots, and the rank
and budget sweeps."""
