"""Running the frozen backbone once: feature/attention capture, batching, `refseg-extract`."""
