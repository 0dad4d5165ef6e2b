"""The one base of the SOM errors: a stable `code` and a message, and picklable, so an error
raised in a worker process (local or Dask) reaches the caller as itself."""

from __future__ import annotations


class SomError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.code, self.message)
