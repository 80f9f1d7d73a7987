"""The entry points: one module per route an adapter takes into a model, each run by the one route driver."""
