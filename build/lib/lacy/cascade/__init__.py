"""Stage 5, the cascade: the small model decodes, the big model fills in its calls."""
