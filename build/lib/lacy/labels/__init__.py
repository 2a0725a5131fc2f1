"""Stage 2, facts and labels: spaCy's fact flags, reference-model losses and judge sets, and the method."""
