"""The registry domain: which repository a name is (namespace), what storage holds for it (stores), uploads,
manifest validation, media types, and the upstream client."""
