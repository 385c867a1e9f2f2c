"""The LLaMA itself: args, model, checkpoints, tokenizer, chat format, generation.

Submodules are imported by name (`from model.tokenizer import ...`) so that the tokenizer and the
chat format stay usable without importing torch."""
