"""What a written folder holds, read from the folder alone: its report (``report``), which weights were
pruned and how (``targets``), its model card (``card``) and a per-tensor inspection (``inspect``).

Depends on the report and the checkpoint (``apt.models``), never on the run that wrote them.
"""
