"""Knowledge amalgamation, the method: its configuration (:mod:`kacli.amalgamation.config`) and
the loss a student trains with (:mod:`kacli.amalgamation.objective`), which reads the teachers'
outputs from a batch or runs them itself (:mod:`kacli.teachers.online`). The stage that trains a
student with them is :mod:`kacli.amalgamate`."""
