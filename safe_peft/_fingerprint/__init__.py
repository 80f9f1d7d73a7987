"""The base fingerprint: its format, computing and checking it, stamping adapters and the Trainer callback."""
