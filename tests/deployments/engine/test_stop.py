"""StopChecker: stop tokens vs eos / ignore_eos, stop strings across token boundaries, truncation,
holdback for streaming, max_tokens."""

import random

import pytest

from deployments.engine.params import SamplingParams
from deployments.engine.stop import FinishReason, StopChecker, StopResult

EOS = (2, 9)


def checker(**kw) -> StopChecker:
    return StopChecker(SamplingParams.create(**kw), eos_token_ids=EOS)


def feed(check: StopChecker, pieces: list[str], first_id: int = 100) -> tuple[int, StopResult | None, str]:
    """Generate `pieces` (one token each, ids from first_id); stop at the first result."""
    text = ""
    for n, piece in enumerate(pieces, start=1):
        text += piece
        result = check.check(first_id + n, text, n)
        if result is not None:
            return n, result, text
    return len(pieces), None, text


def test_eos_stops_unless_ignore_eos():
    assert checker().check(2, "", 1) == StopResult(FinishReason.STOP)
    assert checker().check(9, "", 1).reason is FinishReason.STOP
    assert checker(ignore_eos=True).check(2, "", 1) is None


def test_stop_token_ids_always_stop():
    assert checker(stop_token_ids=[7]).check(7, "", 1).reason is FinishReason.STOP
    assert checker(stop_token_ids=[7], ignore_eos=True).check(7, "", 1).reason is FinishReason.STOP
    assert checker(stop_token_ids=[7], ignore_eos=True).check(8, "", 1) is None


def test_a_stop_tokens_own_text_is_cut():
    # A stop id that decodes to visible text (here "\n"): the token id is returned, its text is not.
    check = checker(stop_token_ids=[13])
    assert check.check(100, "Hello", 1) is None
    assert check.check(13, "Hello\n", 2) == StopResult(FinishReason.STOP, truncate_to=5)
    # A special token (decoded to nothing): nothing to cut.
    check = checker()
    assert check.check(100, "Hello", 1) is None
    assert check.check(2, "Hello", 2) == StopResult(FinishReason.STOP, truncate_to=None)


def test_max_tokens_gives_length():
    check = checker(max_tokens=3)
    assert feed(check, ["a", "b", "c", "d"])[:2] == (3, StopResult(FinishReason.LENGTH))
    assert checker(max_tokens=1).check(2, "", 1).reason is FinishReason.STOP  # eos on the last token: stop


def test_stop_string_wins_over_length_in_the_same_step():
    assert feed(checker(max_tokens=2, stop=["ab"]), ["a", "b"])[1] == StopResult(FinishReason.STOP, 0)


@pytest.mark.parametrize("pieces, n, cut", [
    (["Hel", "lo E", "N", "D more"], 4, 6),  # "END" over three tokens
    (["xx", "END"], 2, 2),  # inside one token
    (["a", "b", "c", "d", "e", "f"], 6, 0),  # a 6-char stop string, one char per token
    (["The end", ". EN", "D"], 3, 9),
    (["ENEN", "D"], 2, 2),  # an overlapping false start
])
def test_stop_strings_across_token_boundaries(pieces, n, cut):
    step, result, text = feed(checker(stop=["END", "abcdef"]), pieces)
    assert (step, result) == (n, StopResult(FinishReason.STOP, cut))
    assert not any(s in text[:cut] for s in ("END", "abcdef"))


def test_the_earliest_stop_string_wins():
    _, result, text = feed(checker(stop=["world", "o w"]), ["hello", " world"])
    assert text[: result.truncate_to] == "hell"


def test_holdback():
    check = checker(stop=["END", "<|x|>"])
    assert [check.holdback(t) for t in ("", "xyz", "xyE", "xyEN", "xyEND?", "a<|", "a<|x|", "E<")] == [
        0, 0, 1, 2, 0, 2, 4, 1]
    assert checker().holdback("anything END") == 0


def stream(check: StopChecker, pieces: list[str]) -> tuple[list[str], str]:
    """What a streaming client receives (the engine's loop): deltas held back, final text cut."""
    text, emitted, deltas = "", 0, []
    for n, piece in enumerate(pieces, start=1):
        text += piece
        result = check.check(100 + n, text, n)
        if result is not None:
            text = text if result.truncate_to is None else text[: result.truncate_to]
            visible = len(text)
        else:
            visible = len(text) - check.holdback(text)
        assert visible >= emitted, "a stop string would cut text that was already streamed"
        deltas.append(text[emitted:visible])
        emitted = visible
        if result is not None:
            break
    return deltas, text


def brute_force(stops: list[str], pieces: list[str]) -> str:
    """Search the whole text after every token; cut at the first match in the first text that has one."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)]
    return text


def test_random_streams_against_a_brute_force_reference():
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        pieces = ["".join(rng.choices("abc", k=rng.randint(0, 3))) for _ in range(12)]
        deltas, final = stream(checker(stop=stops, max_tokens=len(pieces)), pieces)
        assert final == brute_force(stops, pieces), (stops, pieces)
        assert "".join(deltas) == final  # streamed deltas add up to the final text, nothing retracted


def old_holdback(stops: list[str], text: str) -> int:
    """The definition: the longest suffix of `text` that begins some stop string (shorter than it)."""
    return max((n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1) if s.startswith(text[-n:])),
               default=0)


def test_holdback_equals_its_definition_on_random_streams():
    rng = random.Random(1)
    for _ in range(300):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        check, text = checker(stop=stops, max_tokens=1000), ""
        for n in range(1, 15):
            text += "".join(rng.choices("abc", k=rng.randint(0, 3)))
            if check.check(100 + n, text, n) is not None:
                break
            assert check.holdback(text) == old_holdback(stops, text), (stops, text)


class CountingText(str):
    """A str that counts the characters read by indexing or slicing it."""

    reads = 0

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        CountingText.reads += len(piece)
        return piece


def test_each_token_reads_only_its_new_characters():
    """Matching is incremental: with a 1024-character stop string and a long text, a token's check
    and holdback read about the token's own characters, not max_stop_len of them (the old holdback
    sliced every tail up to 1023 characters for every token: quadratic, ~30 ms a token at 40k)."""
    check = checker(stop=["a" * 1023 + "b"], max_tokens=10_000)
    text = ""
    for n in range(1, 2001):
        text += "ba"[n % 2]
        CountingText.reads = 0
        counted = CountingText(text)
        assert check.check(100 + n, counted, n) is None
        assert check.holdback(counted) == (1 if n % 2 else 0)
        assert CountingText.reads <= 2, (n, CountingText.reads)


def test_stop_strings_are_capped_in_number_and_length():
    from deployments.engine.params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
    from model.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=f"stop .*at most {MAX_STOP_STRING_CHARS} characters"):
        SamplingParams.create(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])
    with pytest.raises(InvalidInputError, match=f"stop .*at most {MAX_STOP_STRINGS} stop strings"):
        SamplingParams.create(stop=["x"] * (MAX_STOP_STRINGS + 1))
    assert SamplingParams.create(stop=["x" * MAX_STOP_STRING_CHARS]).stop
