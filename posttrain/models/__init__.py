"""Models: loading, log-probabilities and the built-in tiny models. `from posttrain.models import
create_reference_model` works as `from trl.models import …` does (loaded on first access)."""


def __getattr__(name: str):
    if name == "create_reference_model":
        from posttrain.models.reference import create_reference_model

        return create_reference_model
    raise AttributeError(f"module 'posttrain.models' has no attribute {name!r}")
