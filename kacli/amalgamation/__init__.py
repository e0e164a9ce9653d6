"""Knowledge amalgamation, the method: its configuration (:mod:`kacli.amalgamation.config`),
the loss a student trains with (:mod:`kacli.amalgamation.objective`) and the teachers run in the
training loop (:mod:`kacli.amalgamation.online`). The stage that trains a student with them is
:mod:`kacli.amalgamate`."""
