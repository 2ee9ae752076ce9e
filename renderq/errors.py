"""Domain errors: what went wrong in words a client can act on, with a stable code.

They know nothing of HTTP; webapp.errors maps each class to its status code.
"""
from __future__ import annotations


class DomainError(Exception):
    """A refusal the caller can fix: `code` is stable, `message` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(DomainError):
    """The request itself is wrong (a bad field, a bad image)."""


class TooLarge(DomainError):
    """An upload past MAX_UPLOAD_BYTES."""


class NotFound(DomainError):
    """No such thing, or not visible to the caller."""


class Forbidden(DomainError):
    """It exists but belongs to somebody else."""


class InsufficientCredits(DomainError):
    def __init__(self, price: int, available: int):
        super().__init__("INSUFFICIENT_CREDITS", "This costs %d credits and %d are available; top up the balance "
                                                 "and try again." % (price, available))
        self.price = price
        self.available = available


class Conflict(DomainError):
    """The thing is in a state that does not allow this (a finished job canceled, a result not ready)."""


class IdempotencyKeyReused(DomainError):
    def __init__(self) -> None:
        super().__init__("IDEMPOTENCY_KEY_REUSED", "This Idempotency-Key was used with a different request; "
                                                   "use a new key for a new request.")
