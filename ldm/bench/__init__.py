"""Speed benchmarks side by side with diffusers (the only place in ``ldm`` that may import diffusers)."""
