"""Bearer-key parsing and the constant-time check."""

from roofline.server.auth import bearer_token, is_authorized


def test_bearer_token():
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc  ") == b"abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer") is None
    assert bearer_token(None) is None


def test_is_authorized():
    keys = ("k1", "k2")
    assert is_authorized(None, ())  # no keys: open
    assert is_authorized(b"Bearer k1", keys) and is_authorized(b"Bearer k2", keys)
    for header in (None, b"", b"Bearer k3", b"Bearer k1k1", b"Bearer k", b"k1", b"Bearer \xff"):
        assert not is_authorized(header, keys)
