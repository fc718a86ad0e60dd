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


def test_corrupt_state_is_refused() -> None:
    assert ResumableHash.restore(b"") is None
    assert ResumableHash.restore(b"mhs1" + b"\x00" * 20) is None
    saved = ResumableHash().saved()
    assert saved is not None
    assert ResumableHash.restore(saved[:-1]) is None
