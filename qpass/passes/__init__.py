"""Graph passes, one per file, grouped by IR (``fx/`` for ``torch.export`` graphs)."""
