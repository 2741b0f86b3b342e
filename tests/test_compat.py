"""The tested-transformers range and its warning."""

import warnings

import pytest

from swapmoe.compat import TESTED_TRANSFORMERS, transformers_in_tested_range, warn_if_untested_transformers


@pytest.mark.parametrize(
    ("version", "inside"),
    [("5.17.0", True), ("5.20.1", True), ("5.24.0", True), ("5.16.1", False), ("5.25.0", False),
     ("6.0.0", False), ("4.57.6", False), ("5.25.0.dev0", False)],
)
def test_tested_range(version, inside):
    assert transformers_in_tested_range(version) is inside


def test_untested_release_warns_naming_the_range():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_untested_transformers("5.99.0") is True
        assert warn_if_untested_transformers(TESTED_TRANSFORMERS[1]) is False
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "5.99.0" in message and TESTED_TRANSFORMERS[0] in message and TESTED_TRANSFORMERS[1] in message


def test_the_locked_transformers_is_inside_the_tested_range():
    """CI installs requirements/lock.txt: the release it pins must be one the range names."""
    from pathlib import Path

    lock = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
    pinned = [line.split("==")[1] for line in lock.read_text().splitlines() if line.startswith("transformers==")]
    assert pinned and transformers_in_tested_range(pinned[0]), pinned
