"""The cloud side: publishing to the registry, serving it, deploying to the fleet, sample models."""
