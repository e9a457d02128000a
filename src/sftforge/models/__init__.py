"""The model side: what --model names, loading weights and tokenizers safely, devices and precision, LoRA and QLoRA, the loss head, and a trained model loaded back for inference."""
