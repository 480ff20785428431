"""Accuracy: perplexity and sentence-embedding fidelity computed block by block (``evaluate``), the
held-out accuracy of a run or a folder against its dense source (``accuracy``), and lm-evaluation-harness
tasks (``harness``).

May import ``apt.models``, ``apt.text``, ``apt.folder`` and ``apt.collective``; never ``apt.run``.
"""
