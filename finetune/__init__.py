"""npctalk.finetune: fine-tune a dialogue model on prompt/completion JSONL and evaluate its bundle.

Build-time only (``pip install 'npctalk[export,finetune]'``); the runtime never imports it.
``dataset`` and ``metrics`` are torch-free; ``train`` needs torch and transformers.
"""
