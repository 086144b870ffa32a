"""Orchestration that needs both training and evaluation (which never import each other upward):
an incremental run with the attack on its hand-over (:mod:`veil.workflows.incremental`), and the
``veil incremental`` command (:mod:`veil.workflows.commands`)."""
