"""Stage 4, loading atomically: the kernel that changes a model, its undo, the own assignment and the verification."""
