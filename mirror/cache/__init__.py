"""Every pull-through rule: blob_cache.py and flight.py (single-flight tee), manifest_cache.py (tag TTL,
revalidation, stale-if-error), eviction.py (size cap, TTL)."""
