"""Reading models: GGUF files, Hugging Face safetensors folders, the default model, tiny random ones."""
