"""Tasks: problem sets and their verifiers, the calculator, generated tasks."""
