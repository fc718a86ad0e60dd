"""The ledger: what storage holds, kept in SQLite on every write instead of walked.

Facts (blobs and their sizes, repositories' links, tags, manifests' references, markers, uploads)
are written by the same step as the storage write they describe (ops.py); everything derived from
them (a repository's size and tag count, whether a blob is pinned by private content or reachable
from a manifest, the totals) is kept by triggers in the same transaction (schema.py). Readers ask
indexed queries (queries.py) that cost what a page costs. One thread owns the writing connection
and one the reading one (database.py): no SQLite work on the event loop.

Replicas on one storage each keep their own ledger and share what they write through a journal in
storage (journal.py): every write is a record there, reference-creating ones before they are
acknowledged; each replica tails the others'. gc and eviction delete behind a marker in storage
(fence.py), so a reference created on another replica meanwhile is either seen or refused.
`mirror index rebuild` (rebuild.py) builds a ledger from a walk of storage, streamed, and checks one
against storage. ledger.py is the one object the rest of mirror talks to.
"""
