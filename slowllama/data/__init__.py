"""The data readers: text, JSONL/JSON (text, alpaca, chat), preference pairs and Hugging Face
datasets on disk, into batches."""
