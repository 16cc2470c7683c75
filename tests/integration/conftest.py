import pytest

from vlmalign.methods import logps


@pytest.fixture(autouse=True)
def _fresh_logps_notes():
    """methods/logps.py logs each prefix-sharing fallback note once per process; every test starts
    from no notes logged and leaves none behind, so a test that checks for the note does not depend
    on which tests ran before it."""
    logps._warned.clear()
    yield
    logps._warned.clear()
