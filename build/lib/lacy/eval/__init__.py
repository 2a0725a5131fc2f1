"""Stage 6, evaluation: who is asked about, how biographies are written and scored, one result row."""
