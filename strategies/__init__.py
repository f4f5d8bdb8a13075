"""KV-cache allocation strategies, one per file; each is registered by its yaml in configs/strategy/."""
