"""Light heads trained and evaluated from the cache alone: `refseg-train-head`, `refseg-eval`."""
