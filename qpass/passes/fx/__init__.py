"""torch.fx passes over ``torch.export`` graphs: site discovery, Q/DQ, W8A8, fusion and lowering."""
