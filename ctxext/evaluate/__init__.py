"""Long-context evaluation: perplexity against length, passkey, needle in a haystack, RULER-style
synthetic tasks, baselines side by side, a JSON/markdown report and PNG plots."""
