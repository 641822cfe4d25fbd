from hypothesis import given
from hypothesis import strategies as st

from potluck.inference.stops import StopMatcher


def run(pieces, stops):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush(), m.stopped


def test_stop_split_across_pieces_is_never_emitted():
    assert run(["Hi\nUs", "er: more"], ["\nUser:"]) == ("Hi", True)


def test_near_miss_is_released():
    assert run(["Hi\nUs", "ual"], ["\nUser:"]) == ("Hi\nUsual", False)


def test_no_stops_passes_through():
    assert run(["a", "b"], []) == ("ab", False)


@given(st.text(max_size=40), st.text(min_size=1, max_size=5), st.integers(1, 7))
def test_matches_reference_for_any_chunking(text, stop, size):
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    idx = text.find(stop)
    expected = (text[:idx], True) if idx >= 0 else (text, False)
    assert run(pieces, [stop]) == expected
