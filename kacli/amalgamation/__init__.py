"""Knowledge amalgamation, the method: its configuration (:mod:`kacli.amalgamation.config`) and
the loss a student trains with (:mod:`kacli.amalgamation.objective`). The stage that trains a
student with them is :mod:`kacli.amalgamate`."""
