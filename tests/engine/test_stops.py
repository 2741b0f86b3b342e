"""Stop strings on text deltas: held back while they may be starting, cut at the earliest match."""

from swapmoe.engine.stops import StopStringMatcher


def feed_all(matcher, deltas):
    out, stopped = [], False
    for d in deltas:
        text, stopped = matcher.feed(d)
        out.append(text)
        if stopped:
            break
    return "".join(out), stopped


def test_stop_split_over_three_deltas_is_never_emitted():
    m = StopStringMatcher(["\nUser:"])
    text, stopped = feed_all(m, ["Hello", " there\nU", "se", "r: more", "never"])
    assert (text, stopped) == ("Hello there", True)


def test_partial_match_is_held_then_released():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.held == "ST"
    assert m.feed("AR") == ("STAR", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w", "zzz"])
    assert feed_all(m, ["hel", "lo world"]) == ("hel", True)


def test_after_stop_everything_is_dropped():
    m = StopStringMatcher(["x"])
    assert m.feed("abxcd") == ("ab", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_no_stops_passes_text_through_and_empty_stops_are_ignored():
    m = StopStringMatcher(["", ""])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_overlapping_prefixes():
    m = StopStringMatcher(["aab"])
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert m.feed("b") == ("", True)
