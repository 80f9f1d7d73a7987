"""Writing adapters: the one writer every `fix` surface uses, and the merge of per-rank files."""
