"""Spurious-correlation audit (METHOD.md §3): attribution maps, token removal, scores."""
