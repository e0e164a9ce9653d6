"""Training machinery shared by train-teacher and amalgamate."""
