"""Database layer: typed models (`models`), engines and sessions (`session`), data functions (`crud`)."""
