import pytest
from coarse_init import reset_with_random_coarse_operator

from twolevel_dist.layers.two_level import TwoLevelGroupConv2d


@pytest.fixture(autouse=True)
def _random_coarse_operator(request, monkeypatch):
    """GC-2L layers built in a test get a random A0 unless it is marked ``shipped_init``
    (why: ``coarse_init.py``)."""
    if request.node.get_closest_marker("shipped_init") is None:
        monkeypatch.setattr(TwoLevelGroupConv2d, "reset_parameters",
                            reset_with_random_coarse_operator)
