"""File safety: staged, never-half-written output directories and files (outputs), and the
artifact directory with its manifest (artifact)."""
