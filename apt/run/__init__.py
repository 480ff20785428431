"""The pruning run: a whole model pruned block by block on calibration text and written as a folder.

``config`` (the run's options), ``dtype`` (the compute dtype ``auto`` chooses for the device),
``sequential`` (block-by-block calibration and pruning), ``vision`` (a vision-language model's vision
tower and projector), ``multimodal`` (image+text calibration samples), ``resident`` (a model held in
memory), ``job`` (the job: source to folder, with accuracy), ``state`` (the partial folder and
``--resume``), ``record`` (the report), ``command`` (the command that reproduces a run),
``distributed`` (the same job on many ranks).
The top layer of ``apt``: it may import every other part of it.
"""

from apt.run.config import PruneJob, RunConfig
from apt.run.job import JobInterrupted, prune_model
from apt.run.state import partial_folder

__all__ = ["JobInterrupted", "PruneJob", "RunConfig", "partial_folder", "prune_model"]
