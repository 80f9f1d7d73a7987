"""Sharded models (FSDP2, tensor parallel): the collective load, the ranks' agreement and the placement of new
weights."""
