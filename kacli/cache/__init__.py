"""The teacher cache: ``kacli cache-teachers`` writes it (:mod:`kacli.cache.writer`),
:class:`~kacli.cache.reader.TeacherCache` reads it.

Schema, view policy, resume semantics and the size formula: docs/CACHE.md. The teachers
themselves (loading, labels, running them) are :mod:`kacli.teachers`.
"""
