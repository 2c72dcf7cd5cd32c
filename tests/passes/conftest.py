import pytest


@pytest.fixture(scope="module", params=["tiny_model_dir", "other_model_dir"])
def captured(request):
    """(model dir, eager model, ModelInfo, captured Segments) of each tiny model, per module."""
    from mllmc.compiler.core.capture import capture, load_model

    model_dir = request.getfixturevalue(request.param)
    model, info = load_model(model_dir)
    return model_dir, model, info, capture(model, info)
