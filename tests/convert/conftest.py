"""The family-checkpoint fixture of the engine tests, shared with the conversion tests."""
from tests.engine.conftest import family_checkpoint  # noqa: F401
