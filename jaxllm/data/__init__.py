"""Text to token batches: corpora, tokenizers, the synthetic Markov corpus, chat and tasks."""
