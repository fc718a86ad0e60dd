import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import RegistryError
from mirror.names import (
    Digest,
    parse_content_range,
    parse_digest,
    parse_name,
    parse_page_size,
    parse_range,
    parse_reference,
    parse_upload_id,
)

HEX = "a" * 64


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "a/b/c/d", "my-app_1.2/x__y", "quay.io/org/app",
                                  "a" * 255])
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize("name", ["", "Alpine", "a/../b", "..", "a//b", "/a", "a/", "-a", "a-", "a..b",
                                  "a" * 256, "a\x00b", "a b", "a%2e%2e", "localhost:5000/x"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as e:
        parse_name(name)
    assert e.value.code == "NAME_INVALID" and e.value.status == 400


def test_digests() -> None:
    assert parse_digest(f"sha256:{HEX}") == Digest("sha256", HEX)
    assert str(Digest.of(b"")) == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for bad in [f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}", f"md5:{HEX}", "sha256", f"sha256:{HEX}/..",
                f"sha256:../{HEX[3:]}", "", f"sha512:{HEX}"]:
        with pytest.raises(RegistryError) as e:
            parse_digest(bad)
        assert e.value.code == "DIGEST_INVALID"


def test_references() -> None:
    assert parse_reference("latest") == "latest"
    assert parse_reference("v1.2.3-rc_1") == "v1.2.3-rc_1"
    assert isinstance(parse_reference(f"sha256:{HEX}"), Digest)
    for bad in ["-x", ".x", "a" * 129, "a/b", ""]:
        with pytest.raises(RegistryError) as e:
            parse_reference(bad)
        assert e.value.code == "TAG_INVALID"


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-0", (0, 1)), ("bytes=0-", (0, 100)), ("bytes=10-19", (10, 20)), ("bytes=90-200", (90, 100)),
    ("bytes=-10", (90, 100)), ("bytes=-1000", (0, 100)), ("BYTES = 5-", (5, 100)),
])
def test_ranges(header: str, expected: tuple[int, int]) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-4", "bytes=a-b", "items=0-1", "bytes=0-1,5-6",
                                    "bytes=-0", "bytes=-", "bytes=", "bytes=1"])
def test_bad_ranges(header: str) -> None:
    with pytest.raises(RegistryError) as e:
        parse_range(header, 100)
    assert e.value.code == "RANGE_INVALID" and e.value.status == 416


def test_unsatisfiable_range_reports_size() -> None:
    with pytest.raises(RegistryError) as e:
        parse_range("bytes=100-", 100)
    assert e.value.headers["Content-Range"] == "bytes */100"


def test_page_size() -> None:
    assert parse_page_size(None, 10) is None
    assert parse_page_size("0", 10) == 0
    for bad in ["-1", "x", "11", "1.5"]:
        with pytest.raises(RegistryError) as e:
            parse_page_size(bad, 10)
        assert e.value.code == "PAGINATION_NUMBER_INVALID"


# Fuzz: whatever a client sends, parsing either succeeds with something safe or raises RegistryError.

@given(st.text(max_size=300))
def test_fuzz_names(text: str) -> None:
    try:
        name = parse_name(text)
    except RegistryError as e:
        assert e.code == "NAME_INVALID"
    else:
        assert ".." not in name.split("/") and not name.startswith("/") and len(name) <= 255


@given(st.text(max_size=200))
def test_fuzz_references(text: str) -> None:
    try:
        ref = parse_reference(text)
    except RegistryError as e:
        assert e.code in ("TAG_INVALID", "DIGEST_INVALID")
    else:
        assert "/" not in str(ref) and "\x00" not in str(ref)


@given(st.text(max_size=40), st.integers(min_value=1, max_value=10**12))
def test_fuzz_ranges(header: str, size: int) -> None:
    try:
        start, end = parse_range(header, size)
    except RegistryError as e:
        assert e.code == "RANGE_INVALID"
    else:
        assert 0 <= start < end <= size


def test_content_range_and_upload_ids() -> None:
    assert parse_content_range("0-9") == (0, 10)
    assert parse_content_range("bytes 10-19") == (10, 20)  # some clients add the unit
    for bad in ["", "5", "9-0", "a-b", "-1-2"]:
        with pytest.raises(RegistryError) as e:
            parse_content_range(bad)
        assert e.value.code == "RANGE_INVALID"
    assert parse_upload_id("a" * 32) == "a" * 32
    for bad in ["../x", "A" * 32, "a" * 31, "", "a" * 32 + "/"]:
        with pytest.raises(RegistryError) as e:
            parse_upload_id(bad)
        assert e.value.code == "BLOB_UPLOAD_UNKNOWN"


@given(st.text(max_size=40))
def test_fuzz_content_range(header: str) -> None:
    try:
        start, end = parse_content_range(header)
    except RegistryError as e:
        assert e.code == "RANGE_INVALID"
    else:
        assert 0 <= start < end


@given(st.text(max_size=60))
def test_fuzz_upload_ids(value: str) -> None:
    try:
        upload_id = parse_upload_id(value)
    except RegistryError as e:
        assert e.code == "BLOB_UPLOAD_UNKNOWN"
    else:
        assert "/" not in upload_id and "." not in upload_id
