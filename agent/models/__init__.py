"""Where a model comes from: signed manifests, the registry client, the local store, updates, deployment orders."""
