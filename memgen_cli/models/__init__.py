"""Model building blocks: base loading, latent bookkeeping, weaver, trigger, composition."""
