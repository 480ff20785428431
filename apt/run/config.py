"""The options of a pruning run: ``RunConfig`` (how every block is pruned) and ``PruneJob`` (the whole job:
model, output, data, where activations live), frozen and validated at construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from apt.errors import InvalidInputError
from apt.models.checkpoint import parse_size
from apt.models.loading import DTYPES, check_device
from apt.solver import PruneConfig

ACTIVATION_PLACES = ("host", "device", "disk")


@dataclass(frozen=True)
class RunConfig:
    """How to prune a whole model. ``solver`` applies to every layer; ``targets``/``ignore`` are regexes
    over full module names; ``true_sequential`` recollects each group's inputs after the groups before
    it in the same block are pruned; ``batch_size`` is the number of calibration windows per forward;
    ``expert_min_tokens``: a MoE expert routed fewer tokens is also calibrated on the tokens every
    expert received (``apt.run.calibration``; default: the expert matrix's input width, 0: never);
    ``permute``: reorder each gated MLP's down-projection inputs (with its gate and up rows) where that
    lowers the loss after the refit (``apt.models.permutation``); ``quantize="fp8"``: the folder is written in FP8
    (``apt.run.quantize``), by default once pruning is done, with ``apt-sparse quantize``'s rounding on the run's
    calibration windows (``fp8_compensate``, the default: the error-compensating pass, ``apt.solver.fp8``;
    ``False``: round to nearest); ``fp8_in_run``: instead every pruned Linear is put on the FP8 grid as soon as it
    is pruned (compensated on its own Hessian, or to nearest), and later blocks are pruned on the W8A8 model;
    ``vision``: a vision-language model's vision
    tower and projector are pruned too, before its language model, on the calibration images
    (``apt.run.vision``)."""

    solver: PruneConfig = PruneConfig()
    targets: str | None = None
    ignore: str | None = None
    true_sequential: bool = False
    device: str = "cpu"
    batch_size: int = 8
    correction: float = 0.0
    expert_min_tokens: int | None = None
    permute: bool = False
    quantize: str | None = None
    fp8_compensate: bool | None = None
    fp8_in_run: bool = False
    vision: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in (None, "fp8"):
            raise InvalidInputError(f"--quantize takes fp8, got {self.quantize!r}")
        if self.fp8_compensate is not None and self.quantize != "fp8":
            raise InvalidInputError("--fp8-compensate applies to --quantize fp8 only")
        if self.fp8_in_run and self.quantize != "fp8":
            raise InvalidInputError("--fp8-in-run applies to --quantize fp8 only")
        if self.fp8_compensate is None:  # the default of --quantize fp8: the error-compensating pass
            object.__setattr__(self, "fp8_compensate", self.quantize == "fp8")
        if self.fp8_in_run and self.fp8_compensate and self.permute:
            raise InvalidInputError(
                "--permute cannot be combined with --fp8-in-run's error-compensating pass: drop --fp8-in-run (the "
                "folder is then compensated once pruned) or add --no-fp8-compensate"
            )
        if self.expert_min_tokens is not None and self.expert_min_tokens < 0:
            raise InvalidInputError(f"--expert-min-tokens must be at least 0, got {self.expert_min_tokens}")
        if not (0.0 <= self.correction <= 1.0):
            raise InvalidInputError(f"--correction must lie in [0, 1], got {self.correction}")
        if self.permute and self.correction:
            raise InvalidInputError("--permute and --correction cannot be combined")
        if self.correction and self.true_sequential:
            raise InvalidInputError("--correction and --true-sequential cannot be combined")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class PruneJob:
    """One pruning run. ``dtype`` is the compute dtype (the output keeps the checkpoint's own dtypes):
    ``auto`` computes a checkpoint stored in bfloat16 in bfloat16 where the device multiplies bfloat16
    natively (a CUDA GPU of compute capability 8.0+, a CPU with AVX512-BF16 or AMX) and everything else in
    float32 (``apt.run.dtype``; Hessians and the solver are float32 either way);
    ``activations`` where calibration activations live (``host`` memory, the compute ``device``, or
    ``disk`` under ``activation_dir``, default the partial output folder) and ``activation_dtype`` their
    dtype (default: the compute dtype). ``num_eval_windows=None`` evaluates every full window.
    ``calibration_images``: a folder of images; each calibration window is then paired with one of them and
    run through a vision-language model's processor (``apt.run.multimodal``); ``run.vision`` needs them."""

    model: str
    out: str
    run: RunConfig = RunConfig()
    calibration_data: str = "stdlib"
    eval_data: str = "stdlib"
    num_calibration_samples: int = 128
    max_seq_length: int = 512
    num_eval_windows: int | None = 32
    dtype: str = "auto"
    activations: str = "host"
    activation_dtype: str | None = None
    activation_dir: str | None = None
    calibration_images: str | None = None
    max_shard_size: str = "5GB"
    seed: int = 0
    trust_remote_code: bool = False
    evaluate: bool = True
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        if self.num_calibration_samples < 1 or (self.num_eval_windows is not None and self.num_eval_windows < 1):
            raise InvalidInputError("--num-calibration-samples and --num-eval-windows must be at least 1")
        if self.dtype not in ("auto", *DTYPES) or (self.activation_dtype or "float32") not in DTYPES:
            raise InvalidInputError(
                f"--dtype takes auto or one of {', '.join(DTYPES)}; --activation-dtype one of {', '.join(DTYPES)}"
            )
        if self.activations not in ACTIVATION_PLACES:
            raise InvalidInputError(f"--offload-activations takes one of {', '.join(ACTIVATION_PLACES)}")
        if self.activation_dir and self.activations != "disk":
            raise InvalidInputError("--activation-dir applies to --offload-activations disk only")
        if self.max_seq_length < 2:
            raise InvalidInputError(f"--max-seq-length must be at least 2, got {self.max_seq_length}")
        parse_size(self.max_shard_size)
        check_device(self.run.device)
        if self.run.vision and not self.calibration_images:
            raise InvalidInputError(
                "--prune-vision needs --calibration-images DIR: the vision tower is calibrated on images"
            )

    def fingerprint(self) -> dict:
        """Everything that decides the output's bytes: a resume must match it exactly."""
        options = dataclasses.asdict(self)
        # where activations live changes no byte of the output (their dtype does)
        for key in (
            "out",
            "overwrite",
            "resume",
            "evaluate",
            "eval_data",
            "num_eval_windows",
            "activations",
            "activation_dir",
        ):
            options.pop(key)
        options["run"]["device"] = options["run"]["device"].split(":")[0]  # cuda:LOCAL_RANK differs per rank
        return json.loads(json.dumps(options, default=str))
