"""Data: ADE20K metadata, sources and transforms."""
