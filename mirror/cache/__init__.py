"""Every pull-through rule: blobs.py (single-flight tee), manifests.py (tag TTL, revalidation,
stale-if-error), index.py (the diskcache index)."""
