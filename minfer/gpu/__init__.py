"""The cuda backend: the GPU step (model.py), its fused matmuls (linear.py), sampling on the
device (sampling.py). Imported only where the cuda backend or a GPU lesson asks for it."""
