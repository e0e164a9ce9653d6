"""The teacher cache: ``kacli cache-teachers`` writes it, :class:`TeacherCache` reads it.

Schema, view policy, resume semantics and the size formula: docs/CACHE.md.
"""

from kacli.cache.schema import FORMAT

__all__ = ["FORMAT", "TeacherCache", "collate_cached", "cache_teachers", "cache_summary", "verify_cache"]


def __getattr__(name):
    # Lazy, so that importing the package does not pull in h5py, torch data loading or the models.
    if name in ("TeacherCache", "collate_cached"):
        from kacli.cache import reader

        return getattr(reader, name)
    if name == "cache_teachers":
        from kacli.cache.writer import cache_teachers

        return cache_teachers
    if name in ("cache_summary", "verify_cache"):
        from kacli.cache import info

        return getattr(info, name)
    raise AttributeError(name)
