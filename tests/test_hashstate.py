import hashlib

from hypothesis import given
from hypothesis import strategies as st

from mirror.registry.hashstate import ResumableHash


@given(st.binary(max_size=5000), st.binary(max_size=5000), st.sampled_from(["sha256", "sha512"]))
def test_saved_state_resumes_to_the_same_digest(a: bytes, b: bytes, algorithm: str) -> None:
    h = ResumableHash(algorithm)
    h.update(a)
    saved = h.saved()
    assert saved is not None
    resumed = ResumableHash.restore(saved)
    assert resumed is not None and resumed.size == len(a)
    resumed.update(bytearray(b))
    assert resumed.hexdigest() == hashlib.new(algorithm, a + b).hexdigest()
    assert h.hexdigest() == hashlib.new(algorithm, a).hexdigest()  # hexdigest does not consume


def test_state_is_registry2s_format() -> None:
    """What registry:2 writes to hashstates/sha256/0 at an upload's start (Go's sha256 MarshalBinary):
    magic, the initial chaining values big-endian, an empty block, length 0. A state after 100 bytes
    holds the 36 bytes past the first block and the length."""
    iv = "6a09e667bb67ae853c6ef372a54ff53a510e527f9b05688c1f83d9ab5be0cd19"
    assert ResumableHash().saved() == b"sha\x03" + bytes.fromhex(iv) + bytes(64) + bytes(8)
    h = ResumableHash()
    h.update(bytes(range(100)))
    saved = h.saved()
    assert saved is not None and len(saved) == 108
    assert saved[36:36 + 36] == bytes(range(64, 100)) and saved[72:100] == bytes(28)
    assert saved[100:] == (100).to_bytes(8, "big")
    sha512 = ResumableHash("sha512").saved() or b""
    assert len(sha512) == 204 and sha512[:4] == b"sha\x07"


def test_corrupt_state_is_refused() -> None:
    assert ResumableHash.restore(b"") is None
    assert ResumableHash.restore(b"mhs1" + b"\x00" * 20) is None  # mirror's own format before registry:2's
    assert ResumableHash.restore(b"sha\x02" + bytes(104)) is None  # sha224: not a digest registries use
    saved = ResumableHash().saved()
    assert saved is not None
    assert ResumableHash.restore(saved[:-1]) is None
