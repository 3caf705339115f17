"""OCI images: Kaito's adapter image, image layout directories, registries (via oras-py), push and pull."""
