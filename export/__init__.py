"""export-onnx: turn a Hugging Face causal LM (DialoGPT/GPT-2, Llama family) into a model bundle."""
