"""A port written with non-ASCII digits gets the usual message, not int()'s."""
from __future__ import annotations

import pytest

from corral._observe import parse_address


@pytest.mark.parametrize("text", ["²", "127.0.0.1:²", "127.0.0.1:٣٠٠٠"])
def test_non_ascii_port_digits_are_refused_with_the_port_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"port number 0\.\.65535"):
        parse_address(text)
