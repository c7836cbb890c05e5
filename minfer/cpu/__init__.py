"""The fast CPU step of the numba backend (model.py's forward, with the layers in one compiled
parallel region): model.py, the model; region.py, its compiled step; quant_panel.py and
quant_gemm.py, that step's matmuls for many rows; formats.py, which kernels a model's weights take."""
from .. import stages  # noqa: F401  (first: the kernel cache's stamps, before any kernel here)
