"""nbdweb's models, one module per concern."""

__all__: list[str] = []
