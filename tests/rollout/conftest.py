import pytest

from tests.rollout.scripted import make_kit


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """The scripted kit's tokenizer and tiny models (``tests.rollout.scripted``)."""
    return make_kit(tmp_path_factory)
