"""``python -m ctxext``: the same CLI as the ``ctxext`` command."""

from .cli import app

if __name__ == "__main__":
    app()
