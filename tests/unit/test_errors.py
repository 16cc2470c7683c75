from vlmalign.errors import DataError, LengthError


def test_located_fills_missing_parts_and_keeps_existing():
    e = DataError("empty response", field="chosen").located(file="a.json", index=3, field="other")
    assert str(e) == "a.json: record 3: field 'chosen': empty response"


def test_located_keeps_the_subclass():
    # callers catch LengthError separately (e.g. to report over-long samples): locating it
    # must not turn it into a plain DataError
    e = LengthError("sample has 300 tokens, more than max_length 256").located(file="d.json", index=7)
    assert isinstance(e, LengthError)
    assert str(e) == "d.json: record 7: sample has 300 tokens, more than max_length 256"
