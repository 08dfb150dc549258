"""Content classifiers (the Bayes model, its tokenizer, training)."""
