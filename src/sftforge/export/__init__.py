"""Export: a trained model as a file another runtime loads (GGUF for llama.cpp, Ollama and
LM Studio), with the run's chat template and stop tokens, checked by reading it back."""
