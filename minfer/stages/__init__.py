"""One module per stage of the forward pass: NumPy reference first, then the fast paths."""
