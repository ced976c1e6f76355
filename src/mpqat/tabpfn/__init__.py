"""TabPFN v1 (placeholder docstring, filled later)."""
