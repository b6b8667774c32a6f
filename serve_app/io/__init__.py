"""Formats: raw receiver sample types and SigMF recordings (no Ray imports)."""
