"""Source datasets, the long tail and label noise applied to them, and batches over the result."""
