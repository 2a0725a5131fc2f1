"""Stage 1, the corpus: readers, the people a corpus is about, the synthetic biographies, the tokenizer."""
