"""Stage 3, shards: the corpus tokenised, fact-tagged and scored into Parquet training sequences."""
