"""A teacher: a DETR checkpoint that teaches the student one task.

Everything about a teacher lives here, below the cache and the amalgamation that use it:

- :mod:`kacli.teachers.load`: load a teacher checkpoint and identify it (its file and sha256),
  check it against its task and the other teachers (:func:`~kacli.teachers.load.load_teachers`),
  and the run settings it records (:meth:`~kacli.teachers.load.Teacher.settings`);
- :mod:`kacli.teachers.labels`: its classes matched to its task's by name, its logits remapped;
- :mod:`kacli.teachers.layers`: the sequences a teacher gives (``proj``, ``enc1``, …) by name;
- :mod:`kacli.teachers.run`: one teacher on one batch, its valid tokens picked (what the cache stores);
- :mod:`kacli.teachers.online`: the frozen teachers run in the training loop (``amalgamate --teacher``);
- :mod:`kacli.teachers.quant`: the teachers' sequences as int8 (as cached and as they travel to the device).

``cache-teachers`` (:mod:`kacli.cache`) stores their outputs; ``amalgamate --teacher`` runs them
without any cache.
"""
