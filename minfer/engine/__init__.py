"""Running requests through the model: generation loop (generate.py); batching and speculative
decoding build on the same pieces."""
