"""All training settings in one typed dataclass.

Resolution order: dataclass defaults (the old TensorFlow 1.15 Ascend script's values)
-> preset -> YAML file -> command-line overrides (`--field-name value`).
Unknown keys and values of the wrong type are user errors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from edsr_dist.errors import UserError, did_you_mean
from edsr_dist.locations import is_url

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "npu")
ENGINES = ("auto", "ddp", "horovod")
GRAD_COMMS = ("none", "fp16", "bf16")
LR_SCHEDULES = ("staircase", "multistep", "cosine")  # schedules.py defines each
# Presets that fine-tune a trained x2 model, as the paper does for x3 and x4: they need --init-from.
PRESETS_FROM_X2 = ("paper_x3", "paper_x4")
# Scoring protocols by name; protocols.py defines each (and checks it defines exactly these).
PROTOCOL_NAMES = ("paper", "rgb", "edsr-div2k")
# Experiment trackers (tracking/channel.py) and the pip extra that installs each; TensorBoard, the default, is
# skipped quietly where its package is missing, as before trackers were a setting.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def setting(default, help: str):
    """A Config field with its one-line description: the only place it is written (`train --help` reads it)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _need(ok: bool, msg: str) -> None:
    """Config.check's one check: `msg` (the problem and its fix) as a UserError when `ok` is false."""
    if not ok:
        raise UserError(msg)


@dataclass
class Config:
    # Model (EDSR, Lim et al. 2017). Defaults: the old script's 32 blocks x 256 filters at x2.
    scale: int = setting(2, "upscaling factor: 2, 3 or 4")
    num_blocks: int = setting(32, "residual blocks")
    num_filters: int = setting(256, "feature channels per convolution")
    res_scale: float = setting(0.1, "residual scaling (0.1 for 256 filters, 1.0 for the baseline)")

    # Data.
    data: str = setting("", "patch store (.h5) from build-store, a path or s3://BUCKET/KEY (fetched once into the "
                            "cache); empty: the embedded sample store, cached")
    batch_size: int = setting(16, "global batch over all workers, whatever their number (shares differ by at most "
                                  "one sample); the training does not depend on how it is split")
    accumulate: int = setting(1, "micro-batches per optimizer step on each worker (gradient accumulation): the "
                                 "global batch of more devices on fewer, or in less memory; same result")
    patch_size: int = setting(48, "LR patch side in pixels; the HR patch is scale times it")
    steps_per_epoch: int = setting(0, "steps per epoch; 0 = one pass over the store's training tiles")

    # Optimisation: Adam, lr * decay_rate ** (step // decay_step). The old script: x0.9 every 500 steps;
    # the paper's multistep schedule is the same staircase with x0.5 every 200k steps (preset `paper`).
    lr: float = setting(1e-4, "Adam learning rate at step 0")
    beta1: float = setting(0.9, "Adam beta1")
    beta2: float = setting(0.999, "Adam beta2")
    epsilon: float = setting(1e-8, "Adam epsilon")
    decay_rate: float = setting(0.9, "lr multiplier applied every decay_step steps")
    decay_step: int = setting(500, "steps between lr decays")
    epochs: int = setting(100, "epochs to train")
    seed: int = setting(0, "seed of the initial weights and of every sample's tile, crop and flips")

    # The training recipe beyond the staircase (schedules.py, ema.py; docs/REPRODUCE.md).
    lr_schedule: str = setting("staircase", "staircase | multistep | cosine")
    milestones: str = setting("", "multistep: steps where lr is multiplied by gamma, e.g. 200000,400000")
    gamma: float = setting(0.5, "multistep: factor at each milestone")
    warmup_steps: int = setting(0, "linear warm-up from 0 to lr over this many steps (any schedule)")
    min_lr: float = setting(0.0, "cosine: the rate at the end of the run")
    scale_lr: bool = setting(False, "multiply lr (and min_lr) by batch_size / 16: linear scaling for large batches")
    grad_clip_norm: float = setting(0.0, "clip the global gradient norm to this (0 = off), after the all-reduce")
    ema_decay: float = setting(0.0, "EMA of the weights for validation, eval, sr and export (0 = off; BasicSR 0.999)")
    init_from: str = setting("", "weights or checkpoint a fresh run starts from (tensors whose name and shape match)")

    # Validation and checkpoints (rank 0 writes).
    save_every: int = setting(5, "epochs between checkpoints (and at the end)")
    validate_every: int = setting(5, "epochs between validations (and at the end)")
    save_every_steps: int = setting(0, "also a checkpoint every N steps (0 = off); for preemptible jobs")
    save_every_minutes: float = setting(0.0, "also a checkpoint every M minutes of rank 0's wall clock (0 = off); "
                                             "bounds the work a restart loses")
    keep_last: int = setting(3, "checkpoints kept, besides the best")
    max_val_images: int = setting(0, "validation images used; 0 = all of the store's")
    val_tile: int = setting(0, "LR tile side for validation; 0 = whole image unless it is too large")
    val_benchmark: str = setting("", "a benchmark set folder (Set5/ ...) to validate on instead of the store")
    val_protocol: str = setting("", "also score validation as `eval --protocol`: paper | rgb | edsr-div2k "
                                    "(with val_benchmark, empty means paper)")
    out: str = setting("runs/edsr", "run folder: checkpoints, metrics.jsonl, samples, logs; or s3://BUCKET/PREFIX "
                                    "(staged under the cache folder, uploaded by rank 0 as it is written)")
    resume: str = setting("", "auto (newest valid checkpoint in out, else a fresh start) or a checkpoint path")
    overwrite: bool = setting(False, "a new run in an out that holds one: move the old run aside (never deleted)")
    take_over: bool = setting(False, "become the writer of an out whose owner record names a job you know is dead "
                                     "(without it: only once its pid is gone or its heartbeat is stale)")
    cache_dir: str = setting("", "local copies of s3:// inputs and staged bucket runs; empty: EDSR_DIST_CACHE, "
                                 "else ~/.cache/edsr-dist")
    endpoint_url: str = setting("", "object store endpoint (OBS, MinIO, ...); empty: AWS_ENDPOINT_URL(_S3) or AWS")
    samples_png: bool = setting(True, "write labelled bicubic | EDSR | ground truth crops after the final validation")

    # Execution.
    device: str = setting("auto", "auto | cpu | cuda | npu (auto: an NPU, else a GPU, else the CPU)")
    precision: str = setting("auto", "auto | fp32 | bf16 | fp16 (auto: fp16 on NPUs, bf16 where native, else fp32)")
    channels_last: bool = setting(True, "NHWC activations on CPUs and GPUs (NPUs stay contiguous)")
    engine: str = setting("auto", "auto | ddp | horovod (auto: horovod under horovodrun, else DDP)")
    grad_comm: str = setting("none", "none | fp16 | bf16: dtype of DDP's gradient all-reduce (half the bytes; "
                                     "none = fp32)")
    compile: bool = setting(False, "torch.compile the model (CUDA only; elsewhere a one-line note and ignored)")
    dist_timeout: int = setting(1800, "seconds to wait for other ranks at start-up and in each collective")
    num_threads: int = setting(0, "CPU threads per worker; 0 = OMP_NUM_THREADS or all cores")
    log_every: int = setting(10, "steps between `Step nr:` lines")
    max_steps: int = setting(0, "stop after this many steps in total (0 = no limit)")
    tensorboard: bool = setting(True, "write TensorBoard scalars when the tensorboard package is installed")
    progress: bool = setting(True, "progress bar on rank 0 when stderr is a terminal")

    # Experiment tracking beside metrics.jsonl (docs/TRACKING.md); servers and credentials come from the trackers'
    # own variables (MLFLOW_TRACKING_URI, WANDB_API_KEY, ...), never from settings.
    tracker: str = setting("tensorboard", "trackers, comma-separated: tensorboard, mlflow, wandb (none: no tracker)")
    tracker_project: str = setting("edsr-dist", "MLflow experiment / W&B project the run is logged to")
    track_checkpoint: bool = setting(False, "also send the best checkpoint to the trackers at the end (large)")

    def check(self) -> "Config":
        """Each setting within its range; returns self. The groups run in this order, so the first problem
        reported for a bad configuration stays the same."""
        self._check_finite()
        self._check_model_and_batch()
        self._check_optimizer()
        self._check_epochs_and_saving()
        self._check_lr_schedule_and_update()
        self._check_start_and_runtime()
        self._check_names()
        return self

    def _check_finite(self) -> None:
        """No float setting is inf or nan: inf passes every "> 0" below and would reach torch as it is."""
        for name, kind in _field_types().items():
            value = getattr(self, name)
            _need(kind is not float or math.isfinite(value),
                  f"{name} must be a finite number, got {value}; pass --{name.replace('_', '-')} with a number")

    def _check_model_and_batch(self) -> None:
        """The network's shape and the batch: scale, blocks, filters, batch, accumulation, patch."""
        _need(self.scale in (2, 3, 4), f"scale must be 2, 3 or 4, got {self.scale}; pass --scale 2|3|4")
        _need(self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")
        _need(self.num_filters >= 1, f"num_filters must be >= 1, got {self.num_filters}")
        _need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _need(self.accumulate >= 1, f"accumulate must be >= 1 (1 = no accumulation), got {self.accumulate}")
        check_batch_splits(self.batch_size, 1, self.accumulate)
        _need(self.patch_size >= 4, f"patch_size must be >= 4, got {self.patch_size}")

    def _check_optimizer(self) -> None:
        """Adam's settings and the step decay of the learning rate."""
        _need(self.lr > 0, f"lr must be positive, got {self.lr}; pass for example --lr 1e-4")
        # torch.optim.Adam's own checks (torch/optim/adam.py, Adam.__init__), as one line instead of its traceback.
        _need(0 <= self.beta1 < 1, f"beta1 must be in [0, 1), got {self.beta1}; the paper uses --beta1 0.9")
        _need(0 <= self.beta2 < 1, f"beta2 must be in [0, 1), got {self.beta2}; the paper uses --beta2 0.999")
        _need(self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}; the paper uses --epsilon 1e-8")
        _need(self.decay_rate > 0 and self.decay_rate <= 1, f"decay_rate must be in (0, 1], got {self.decay_rate}")
        _need(self.decay_step >= 1, f"decay_step must be >= 1, got {self.decay_step}")

    def _check_epochs_and_saving(self) -> None:
        """How long the run is, and how often it saves and validates (and on what)."""
        _need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _need(self.steps_per_epoch >= 0, f"steps_per_epoch must be >= 0, got {self.steps_per_epoch}")
        _need(self.save_every >= 1, f"save_every must be >= 1 epoch, got {self.save_every}")
        _need(self.validate_every >= 1, f"validate_every must be >= 1 epoch, got {self.validate_every}")
        _need(self.save_every_minutes >= 0, f"save_every_minutes must be >= 0 (0 = off), got {self.save_every_minutes}")
        _need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        _need(not self.val_benchmark or is_url(self.val_benchmark) or Path(self.val_benchmark).is_dir(),
              f"val_benchmark {self.val_benchmark} is not a folder; pass one benchmark set's folder "
              "(such as benchmark/Set5) or leave it empty to validate on the store")

    def _check_lr_schedule_and_update(self) -> None:
        """The learning-rate schedule (warmup, cosine floor, milestones) and how each update is shaped
        (gradient clipping, EMA)."""
        _need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        _need(0 <= self.min_lr < self.lr, f"min_lr must be >= 0 and below lr ({self.lr}), got {self.min_lr}")
        _need(self.grad_clip_norm >= 0, f"grad_clip_norm must be >= 0 (0 = off), got {self.grad_clip_norm}")
        _need(0 <= self.ema_decay < 1,
              f"ema_decay must be in [0, 1) (0 = off; BasicSR uses 0.999), got {self.ema_decay}")
        try:
            milestones = [float(m) for m in self.milestones.replace(" ", "").split(",") if m]
        except ValueError:
            milestones = [-1.0]
        _need(all(m >= 1 and m.is_integer() for m in milestones),
              f"milestones must be whole step numbers separated by commas, e.g. 200000,400000; got {self.milestones!r}")
        _need(self.lr_schedule != "multistep" or milestones,
              "lr_schedule multistep needs --milestones, e.g. --milestones 200000,400000")

    def _check_start_and_runtime(self) -> None:
        """Where the run starts from, and its timeouts, limits, logging, threads and validation sizes."""
        _need(not (self.init_from and self.resume and self.resume != "auto"),
              f"--init-from starts a new run and --resume {self.resume} continues one; pass only one of them")
        _need(not self.init_from or is_url(self.init_from) or Path(self.init_from).is_file(),
              f"init_from {self.init_from} is not a file; pass a .ckpt, .pt, .pth or .safetensors file with the "
              "weights to start from")
        _need(self.dist_timeout >= 1, f"dist_timeout must be >= 1 second, got {self.dist_timeout}")
        _need(self.max_steps >= 0, f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}")
        _need(self.log_every >= 1, f"log_every must be >= 1 step, got {self.log_every}")
        _need(self.num_threads >= 0, f"num_threads must be >= 0 (0 = OMP_NUM_THREADS or all cores), got "
              f"{self.num_threads}")
        _need(self.save_every_steps >= 0, f"save_every_steps must be >= 0 (0 = off), got {self.save_every_steps}")
        _need(self.max_val_images >= 0, f"max_val_images must be >= 0 (0 = all), got {self.max_val_images}")
        _need(self.val_tile >= 0, f"val_tile must be >= 0 (0 = whole image), got {self.val_tile}")

    def _check_names(self) -> None:
        """Settings chosen from a list of names: trackers, precision, device, engine, schedules, protocol."""
        check_trackers(tracker_names(self.tracker), "--tracker")
        _need(bool(self.tracker_project.strip()), "tracker_project must not be empty; pass --tracker-project NAME")
        for name, allowed in (("precision", PRECISIONS), ("device", DEVICES), ("engine", ENGINES),
                              ("grad_comm", GRAD_COMMS),
                              ("lr_schedule", LR_SCHEDULES),
                              ("val_protocol", ("", *PROTOCOL_NAMES))):
            value = getattr(self, name)
            _need(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tracker_names(text: str) -> list[str]:
    """`--tracker mlflow,wandb` -> ["mlflow", "wandb"]; "none" or "" -> []."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def check_trackers(names: list[str], flag: str) -> None:
    """Known trackers whose package is installed (TensorBoard excepted: missing, it is skipped quietly)."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{flag} {name!r} is not a tracker{did_you_mean(name, TRACKERS)}; choose from "
                            f"{', '.join(TRACKERS)} (comma-separated), or none")
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise UserError(f"{flag} {name}: the {name} package is not installed; pip install "
                            f"'edsr-dist[{TRACKERS[name]}]', or drop {name} from {flag}")


# The paper's recipe (Lim et al. 2017, section 4.2): batch 16 of 48x48 LR patches, Adam (0.9, 0.999, 1e-8), lr 1e-4
# halved every 2 x 10^5 updates, L1 loss; x3 and x4 start from the trained x2 model. 300 epochs of 1000 steps and
# validation on 10 images are the authors' code's (EDSR-PyTorch src/option.py: --epochs 300, --test_every 1000,
# --decay 200; src/demo.sh: x3/x4 "--pre_train [pre-trained EDSR_x2 model dir]").
_PAPER_RECIPE = {
    "num_blocks": 32, "num_filters": 256, "res_scale": 0.1, "batch_size": 16, "patch_size": 48, "lr": 1e-4,
    "decay_rate": 0.5, "decay_step": 200_000, "epochs": 300, "steps_per_epoch": 1000, "max_val_images": 10,
}

# Presets only name what differs from the defaults (the paper_x* presets name every setting the paper fixes).
PRESETS: dict[str, dict] = {
    # The old TensorFlow script, as it was configured (the defaults).
    "tf_seed": {},
    # Paper model (EDSR, 32x256, res_scale 0.1) with the paper's schedule: halve lr every 200k steps.
    "paper": {"decay_rate": 0.5, "decay_step": 200_000},
    # The paper's chain: x2 from scratch, then x3 and x4 fine-tuned from it (`--init-from` the x2 run's checkpoint).
    "paper_x2": {**_PAPER_RECIPE, "scale": 2, "out": "runs/paper_x2"},
    "paper_x3": {**_PAPER_RECIPE, "scale": 3, "out": "runs/paper_x3"},
    "paper_x4": {**_PAPER_RECIPE, "scale": 4, "out": "runs/paper_x4"},
    # EDSR baseline: 16 blocks x 64 filters, no residual scaling.
    "baseline": {"num_blocks": 16, "num_filters": 64, "res_scale": 1.0},
    # The CPU demo on the embedded sample store: small model, short run, under 3 minutes on 2 cores.
    "sample": {
        "num_blocks": 8, "num_filters": 32, "res_scale": 1.0, "lr": 2e-3, "batch_size": 16,
        "patch_size": 24, "epochs": 10, "steps_per_epoch": 150, "decay_rate": 0.5, "decay_step": 1000,
        "save_every": 5, "validate_every": 5, "log_every": 50, "out": "runs/sample",
    },
}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(name: str, value, kind: type, origin: str):
    """Convert a YAML or command-line value to the field's type, or explain what is expected."""
    def bad() -> UserError:
        hint = {bool: "true or false", int: "a whole number", float: "a number such as 1e-4", str: "text"}[kind]
        return UserError(f"{origin}: {name} expects {kind.__name__}, got {value!r}; pass {hint}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise bad()
    if kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                raise bad() from None
            if as_float.is_integer():
                return int(as_float)
        raise bad()
    if kind is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise bad()


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def apply_overrides(cfg: Config, values: dict, origin: str) -> Config:
    types = _field_types()
    updates = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types:
            raise UserError(f"{origin}: unknown setting {key!r}{did_you_mean(name, types)}; "
                            "see `edsr-dist train --help` for the valid names")
        updates[name] = _coerce(name, value, types[name], origin)
    return dataclasses.replace(cfg, **updates)


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        if isinstance(exc, yaml.constructor.ConstructorError):  # a tag such as !!python/object: never a setting
            raise UserError(f"config file {path} has a YAML tag{where} that is not plain data ({exc.problem}); "
                            "settings are numbers, text and true/false: remove the tag") from None
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of setting: value")
    return data


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: dict | None = None) -> Config:
    cfg = Config()
    file_values = load_yaml(config_file) if config_file else {}
    # A YAML file may name its own preset; the command line wins.
    preset = preset or file_values.pop("preset", None)
    file_values.pop("preset", None)
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if file_values:
        cfg = apply_overrides(cfg, file_values, f"config file {config_file}")
    if overrides:
        cfg = apply_overrides(cfg, overrides, "command line")
    return cfg.check()


def parse_override_args(args: list[str]) -> dict:
    """Turn `--field-name value` / `--field-name=value` pairs into a dict (values still strings)."""
    out: dict[str, str] = {}
    names = set(field_names())
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}; settings are given as --field-name value")
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in names:
            flags = [f"--{n.replace('_', '-')}" for n in names]
            raise UserError(f"unknown option --{key}{did_you_mean('--' + key, flags)}; "
                            "see `edsr-dist train --help` for the valid names")
        if not eq:
            if _field_types()[name] is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
                value = "true"  # a bare boolean flag switches it on
            else:
                if i + 1 == len(args):
                    raise UserError(f"option --{key} needs a value")
                i += 1
                value = args[i]
        out[name] = value
        i += 1
    return out


def describe_fields() -> str:
    """One line per setting, for `--help`: flag, default, what it does (the field's own description)."""
    defaults = Config()
    lines = []
    for f in dataclasses.fields(Config):
        flag = f"--{f.name.replace('_', '-')}"
        lines.append(f"  {flag:<20} {getattr(defaults, f.name)!r:<11} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def format_config(cfg: Config, preset: str | None = None) -> str:
    """The resolved settings as YAML that `--config` reads back; what differs from the defaults is marked."""
    defaults = Config()
    sets = ", ".join(f"{k}={v!r}" for k, v in PRESETS.get(preset or "", {}).items()) or "nothing"
    lines = [f"# preset {preset} sets: {sets}"] if preset else []
    for f in dataclasses.fields(Config):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        line = yaml.safe_dump({f.name: value}, default_flow_style=False).strip()
        lines.append(line if value == default else f"{line:<28} # default {default!r}")
    return "\n".join(lines)


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved in a checkpoint; tolerant of fields added since."""
    known = set(field_names())
    return apply_overrides(Config(), {k: v for k, v in values.items() if k in known}, "checkpoint config")


TRAIN_HELP = """usage: edsr-dist train [--config FILE] [--preset NAME] [--field-name value ...]

Train EDSR. Without --data, the embedded sample store is built (or reused) in the cache folder.
Every setting below can be given as --field-name value (defaults shown are the old TF script's):
"""


def parse_train_args(argv: list[str]) -> Config:
    """`edsr-dist train` arguments -> Config; the worker and the launcher (which checks them before starting
    anyone) both call this."""
    argv = list(argv)
    preset = config_file = None
    print_config = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(TRAIN_HELP + describe_fields() + f"\n\npresets: {', '.join(PRESETS)} (see edsr_dist/config.py); "
                  "--print-config prints the settings a command line resolves to (`--preset NAME --print-config`)")
            raise SystemExit(0)
        if arg == "--print-config":
            print_config = True
            i += 1
            continue
        key, eq, value = arg.partition("=")
        if key in ("--preset", "--config"):
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"option {key} needs a value")
                i += 1
                value = argv[i]
            if key == "--preset":
                preset = value
            else:
                config_file = value
        else:
            rest.append(arg)
        i += 1
    cfg = build_config(preset=preset, config_file=config_file, overrides=parse_override_args(rest))
    preset = preset or (load_yaml(config_file).get("preset") if config_file else None)
    # A training run only (bench measures these presets without weights to start from).
    if preset in PRESETS_FROM_X2 and not cfg.init_from and cfg.resume in ("", "auto"):
        raise UserError(f"preset {preset} fine-tunes a trained x2 model, as the paper does; pass --init-from with "
                        "the x2 run's checkpoint, e.g. --init-from runs/paper_x2/checkpoints/best")
    if print_config:
        print(format_config(cfg, preset))
        raise SystemExit(0)
    return cfg


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` items in `parts` consecutive shares that differ by at most one, the larger ones first (16 in 3:
    6, 5, 5). The global batch over the workers and a worker's share over its micro-batches are both split so."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def batch_shares(batch_size: int, workers: int) -> list[int]:
    """Each worker's number of samples of every global batch: worker r takes the r-th consecutive share."""
    return split_evenly(batch_size, workers)


def describe_split(batch_size: int, workers: int) -> str:
    """How a global batch is split, for the launcher's restart line: `4 each` or `6/5/5`."""
    shares = batch_shares(batch_size, workers)
    return f"{shares[0]} each" if len(set(shares)) == 1 else "/".join(map(str, shares))


def check_batch_splits(batch_size: int, workers: int, accumulate: int = 1, flag: str = "") -> None:
    """Every worker gets at least one sample in each of its `accumulate` micro-batches (launcher, trainer, sampler,
    self-healing and bench all ask here); `flag` names the option that set the number of workers, when one did."""
    if batch_size < workers * accumulate:
        of = f" of {flag} {workers}" if flag else ""
        what = (f"--accumulate {accumulate}" if workers == 1 else
                f"the {workers} workers{of}" + (f" x --accumulate {accumulate}" if accumulate > 1 else ""))
        raise UserError(f"batch_size {batch_size} (global) is smaller than {what}: every worker needs at least "
                        f"{accumulate} sample(s) per step; pass --batch-size {workers * accumulate} or more"
                        + (" or a smaller --accumulate" if accumulate > 1 else ""))
