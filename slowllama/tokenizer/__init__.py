"""Tokenizers (sentencepiece, tokenizers, tiktoken, GGUF vocabularies) and chat templates, read and
rendered as transformers does."""
