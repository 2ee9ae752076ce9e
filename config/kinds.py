"""The job-kind registry: what each kind costs, needs and how long one attempt may take."""
from __future__ import annotations

from dataclasses import dataclass, replace

STYLES = ("sketch", "sepia", "cartoon", "pixelate", "unfiltered")


@dataclass(frozen=True)
class JobKind:
    name: str
    price: int
    needs_photo: bool  # photo.render sends the photo to the generator; image.generate only the prompt
    soft_time_limit: float
    hard_time_limit: float
    generator_timeout: float


KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("photo.render", price=1, needs_photo=True, soft_time_limit=90, hard_time_limit=120,
                generator_timeout=60),
        JobKind("image.generate", price=2, needs_photo=False, soft_time_limit=90, hard_time_limit=120,
                generator_timeout=60),
    )
}


def get_kind(name: str) -> JobKind:
    """The registered kind called `name`; KeyError lists the valid ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError("unknown kind %r; valid kinds: %s" % (name, ", ".join(sorted(KINDS)))) from None


def use_limits(limits: dict[str, tuple[float, float, float]]) -> None:
    """Apply KIND_LIMITS (soft, hard, generator timeout per kind) for this process."""
    for name, (soft, hard, timeout) in limits.items():
        KINDS[name] = replace(KINDS[name], soft_time_limit=soft, hard_time_limit=hard, generator_timeout=timeout)


def longest_hard_time_limit() -> float:
    return max(kind.hard_time_limit for kind in KINDS.values())
