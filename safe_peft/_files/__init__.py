"""Stage 1, reading the adapter: locate its files, read and bound its config and weights header, rank files, the
manifest."""
