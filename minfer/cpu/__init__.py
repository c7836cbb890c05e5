"""The fast CPU step of the numba backend (model.py's forward, with the layers in one compiled
parallel region): model.py in this folder; formats.py, which kernels a model's weights take."""
