"""One typed config tree: YAML file + ``key=value`` overrides, validated before anything starts.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with one line that
names the key and what is allowed; launchers print that line and exit non-zero (no traceback).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distssl.config.recipes import resolve_config
from distssl.config.typed_tree import ConfigError, build, changed_keys, flatten, parse_override, set_path
from distssl.data.index import describe_missing
from distssl.data.spec import DataSpec, data_sources  # noqa: F401 - the schema's data keys, re-exported
from distssl.errors import MissingCredentials, MissingExtra
from distssl.ssl import ALGORITHMS, config_sections
from distssl.storage import atomic, store
from distssl.storage.store import redact


@dataclass
class RunConfig:
    """Where the run writes, its seed, logging, trackers and the signals it saves on."""

    out_dir: str = "runs/default"  # config.yaml, metrics, checkpoints/, the exports; rerun = resume
    seed: int = 0  # initial weights, data order and every augmentation choice
    log_every: int = 10  # steps between metrics.jsonl lines (and heartbeats)
    trace_shards: bool = False  # debugging: log which shards each rank/worker reads, per epoch (out_dir/trace/)
    # a scheduler's preemption signals: on any of them every rank saves a complete checkpoint at the
    # next step boundary and the run exits 75 ("rerun to resume"); [] = die on them as before
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # experiment trackers, from rank 0: tensorboard (out_dir/tb), mlflow (MLFLOW_TRACKING_URI), wandb (WANDB_*);
    # e.g. run.loggers=[tensorboard,mlflow]; [] = metrics.jsonl only
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class TrainConfig:
    """The loop: steps, the global batch, evals and checkpoints, loader workers, precision."""

    steps: int = 1000  # optimizer steps; a larger value on a finished run continues it
    batch_size: int = 16  # global labeled batch; each rank gets batch_size / world_size
    eval_every: int = 250  # steps between evals of the EMA weights (0 = only at the end)
    ckpt_every: int = 250  # steps between checkpoints (0 = only at the end, on preemption and Ctrl-C)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    num_workers: int = 1  # loader processes per stream per rank; 0 loads in the training process
    eval_batch_size: int = 256  # global
    max_bad_fraction: float = 0.01  # unusable samples (skipped and counted) above this fraction stop the run
    micro_batch_size: int = 0  # per-rank labeled micro-batch; 0 = the whole per-rank batch (no accumulation)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 override the DeepSpeed template
    channels_last: bool = True  # NHWC on GPU (faster convolutions with tensor cores); ignored on CPU


ALGORITHM_NAMES = tuple(ALGORITHMS)


@dataclass
class SSLKeys:
    """The keys every algorithm reads; SSLConfig adds each algorithm's own section (distssl.ssl)."""
    # the method: a pseudo-label rule, fixmatch (fixed tau), flexmatch, freematch (adaptive thresholds),
    # softmatch (soft weights), uda (sharpened soft targets), on which distribution alignment
    # (dist_align) works; or a consistency method: pimodel, temporal_ensembling, meanteacher, vat; or
    # mixmatch / remixmatch (K views, guesses, MixUp)
    algorithm: Literal[ALGORITHM_NAMES] = "fixmatch"  # type: ignore[valid-type]
    tau: float = 0.95  # confidence threshold of a pseudo-label (FixMatch's tau; the threshold rules' base)
    # weight of the unlabeled loss; the consistency methods multiply their own weight by it
    # (1 = the method's default); 0 = the supervised baseline of the recipe
    lambda_u: float = 1.0
    mu: int = 7  # unlabeled batch = mu x labeled batch
    dist_align: bool = True  # distribution alignment (ReMixMatch): weak probabilities x p_target / p_model
    # p_target: uniform, the labeled set's classes, or the unlabeled set's as estimated during the run (EM on the
    # model's predictions: a bucket whose class mix nobody knows)
    dist_align_target: Literal["uniform", "labeled", "estimated"] = "uniform"
    dist_align_momentum: float = 0.99  # ~100-batch memory, like ReMixMatch's 128-batch window
    ema_decay: float = 0.999  # EMA of the weights, evaluated and exported
    ema_warmup: bool = True  # decay min(ema_decay, 1 - (1 + step) ** -0.75) (timm): early EMA follows the model
    # "shared_bn": labeled + strong forwarded with gradients, the weak view without (it only makes
    # pseudo-labels), normalised with the BatchNorm statistics of that forward: it skips the weak
    # view's backward, which "concat" (FixMatch's reference cat(labeled, weak, strong) forward with
    # gradients) pays; step times and the demo's top-1 over seeds: docs/benchmarks.md
    weak_forward: Literal["shared_bn", "concat"] = "shared_bn"
    # images outside the label set in the unlabeled data: "iomatch" (its keys: ssl.iomatch) adds an outlier head,
    # keeps outliers out of the pseudo-labels and trains them as a (K+1)-th class; pseudo-label rules only
    open_set: Literal["none", "iomatch"] = "none"
    # long-tailed classes: "abc" or "acr" (keys: ssl.abc, ssl.acr) add a balanced classifier, which the run
    # evaluates and exports; pseudo-label rules only
    imbalance: Literal["none", "abc", "acr"] = "none"


# ssl.<name>: each algorithm's own keys, from the dataclass in its file (adding an algorithm edits no config)
SSLConfig = dataclasses.make_dataclass(
    "SSLConfig", [(name, keys, field(default_factory=keys)) for name, keys in config_sections().items()],
    bases=(SSLKeys,))
SSLConfig.__module__ = __name__  # where pickle (Ray's trial config) finds it
SSLConfig.__doc__ = "The SSL method: ssl.algorithm, the keys every algorithm reads, and each one's own section."


@dataclass
class ModelConfig:
    """The timm backbone: its name, classes, starting weights and regularisation."""

    name: str = "resnet10t"  # any timm model name (timm.list_models()), or wrn28_2
    num_classes: int = 10  # classes of the classifier: the labeled set's (its index.json names them)
    # weights to start from: a safetensors / torch state dict file or URL, or a run folder of ours
    pretrained: Optional[str] = None
    drop_path_rate: float = 0.0  # stochastic depth, for the models that have it (ViT, ConvNeXt, ResNet, ...)
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)
    freeze_backbone_steps: int = 0  # fine-tuning: only the classifier learns for the first N steps
    grad_checkpointing: bool = False  # activation checkpointing (timm set_grad_checkpointing), for big backbones


@dataclass
class OptimConfig:
    """The optimizer (any of timm's) and the learning-rate schedule."""

    # any name of timm's optimizer factory (timm.optim.list_optimizers()): sgd, adamw, lamb, lion, ...
    name: str = "sgd"
    lr: float = 0.03  # peak learning rate, then the cosine decay
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    betas: Optional[list[float]] = None  # Adam-family (b1, b2); null = the optimizer's default
    eps: Optional[float] = None  # Adam-family; null = the optimizer's default
    weight_decay: float = 5e-4  # decoupled for adamw/lamb; never on biases, norms or no_weight_decay()
    warmup_steps: int = 0  # linear lr warm-up from 0
    cosine_fraction: float = 7 / 16  # lr = lr0 * cos(pi * cosine_fraction * k / K), FixMatch's 7/16
    backbone_lr_scale: float = 1.0  # fine-tuning: backbone lr = lr * this (the classifier keeps lr)
    layer_decay: float = 1.0  # fine-tuning: < 1 scales each layer's lr by layer_decay ** (depth from the top)


# timm optimizers whose update of a tensor depends on the tensor as a whole (LAMB/LARS trust ratios,
# NovoGrad's per-layer norms, Adafactor's factored moments, Kron/Muon's matrices): on ZeRO's flat
# partitions they compute something else
PER_TENSOR_OPTIMIZERS = ("lamb", "lars", "larc", "novograd", "adafactor", "kron", "muon", "adahessian")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed: the ZeRO stage, its JSON template and the collective timeout."""

    zero_stage: int = 2  # DeepSpeed ZeRO: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters
    # JSON template: a path, or a shipped one by name (zero2_bf16); null or empty = zero{zero_stage}.json
    template: Optional[str] = None
    timeout_minutes: float = 10  # collective timeout: a dead peer fails the run this fast (0.5 = 30 s)


@dataclass
class CTAugmentConfig:
    """CTAugment's policy (data.strong_aug=ctaugment): defaults of FixMatch's libml/ctaugment.py."""
    depth: int = 2  # ops per strong view (and per probe)
    threshold: float = 0.85  # bins weighted under this fraction of the op's best are not drawn
    decay: float = 0.99  # each probe moves its bins' weights by 1 - decay towards its proximity
    # the batch of step s is drawn with the policy of step s - lag, so loader workers may run this many
    # batches ahead without waiting for it (and a resume draws the same views)
    lag: int = 32


@dataclass
class DataConfig:
    """The shard sets, the views and where they are made, and the shard cache."""

    # one shard set (folder/URL with index.json, or a brace pattern), or several with weights (DataSpec)
    labeled: DataSpec = ""
    unlabeled: DataSpec = ""  # the unlabeled images (a labeled set's images may be among them)
    eval: str = ""  # the held-out shard set the EMA weights are scored on
    # when set, the bundled MNIST-5k demo shards are built here if missing, and only when data.labeled /
    # unlabeled / eval are the demo's sets under it
    demo_root: Optional[str] = None
    # remote shards (s3://, gs://, az://...) read once are kept here, on each node's local disk, shared by its
    # ranks and loader workers, least recently used ones deleted past cache_limit_gb; null = no cache
    cache_dir: Optional[str] = None
    cache_limit_gb: float = 100.0  # per node
    # when the sets name their classes differently: "strict" refuses, "by_name" accepts the same names
    # in another order (labels remapped to the labeled set's order), "by_index" trusts the label numbers
    class_match: Literal["strict", "by_name", "by_index"] = "strict"
    image_size: Optional[int] = None  # null = the model's pretrained config (or the pretrained file's JSON)
    flip: bool = True  # horizontal flip in the views; off for digits and text
    # the base image of both views: "pad" resizes + centre-crops once and each view takes a crop of
    # it reflect-padded by pad_fraction (CIFAR's recipe); "random_resized" takes one Inception-style
    # crop per image (area crop_scale, aspect crop_ratio) resized to image_size (FixMatch's ImageNet input)
    crop: Literal["pad", "random_resized"] = "pad"
    pad_fraction: float = 0.125  # crop=pad only
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # crop=random_resized only
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # crop=random_resized only
    interpolation: Optional[Literal["bilinear", "bicubic"]] = None  # null = the model's pretrained config
    # eval: centre crop of this fraction of the shorter side (timm's crop_pct); null = 1.0 with crop=pad
    # (the full image, as training saw it), else the model's pretrained config (0.875 for ResNet-50)
    eval_crop_pct: Optional[float] = None
    # mix samples from this many shards at once in each loader worker (FixMatch's ImageNet input
    # interleaves 16 files): a batch draws from many shards, and batch-mates change every epoch
    interleave_shards: int = 16
    # where the unlabeled views are made: "loader" (worker processes, PIL) or "device" (workers only
    # decode and crop; flip, pad crop, RandAugment and Cutout run batched on the training device, with
    # every random choice still drawn from the sample's seed, so resume stays exact)
    augment_on: Literal["loader", "device"] = "loader"
    # where the training images' JPEGs are decoded: "loader" (worker processes), or "device": workers read
    # the shards and draw each sample's crop box and view choices, and ship the JPEG bytes; the trainer
    # decodes each batch with TorchCodec's batched decode_jpeg (nvJPEG on a GPU; the [decode] extra), crops,
    # resizes and makes the views there (so it implies augment_on=device, for the labeled stream too). Images
    # that are not JPEG are decoded in the loader as before. On a CPU-only machine keep "loader"
    decode_on: Literal["loader", "device"] = "loader"
    # the labeled images' view: "weak" (flip and crop, FixMatch's) or "strong" (RandAugment + Cutout on top:
    # Noisy Student's input noise on a student's labels and pseudo-labels)
    labeled_view: Literal["weak", "strong"] = "weak"
    # the labeled images' targets: "hard" (cls), or "soft": a sample whose json carries ``soft`` (class ids and
    # probabilities, a teacher's calibrated prediction: distssl-selftrain's pseudo-labels) is trained towards
    # that distribution, the others towards their one-hot cls (the supervised step: ssl.lambda_u=0)
    labeled_targets: Literal["hard", "soft"] = "hard"
    randaugment_ops: int = 2  # RandAugment operations per strong view
    # the strong views' augmentation: RandAugment (random magnitudes) or CTAugment (Berthelot et al. 2020:
    # magnitudes learned from probes of the labeled images, the same policy on every rank); Cutout follows both
    strong_aug: Literal["randaugment", "ctaugment"] = "randaugment"
    ctaugment: CTAugmentConfig = field(default_factory=CTAugmentConfig)
    cutout_fraction: float = 0.5  # Cutout square side, as a fraction of the image side (at most)
    mean: Optional[list[float]] = None  # null = from the model's pretrained config, like image_size
    std: Optional[list[float]] = None  # per channel, like mean; null = from the model's pretrained config
    shuffle_buffer: int = 500  # samples each loader reader shuffles among (on top of the shard order)


@dataclass
class SelfTrainConfig:
    """Noisy Student self-training (Xie et al. 2020), read by distssl-selftrain only.

    Round 0 is the run the rest of the config describes; each later round's teachers label data.unlabeled,
    their confident, class-balanced predictions join the human labels, and a noised student trains on both."""
    rounds: int = 2  # round 0 (the configured run) and rounds - 1 students; --rounds sets it
    student_model: Optional[str] = None  # the students' timm model (null = model.name); the paper's grow
    # a teacher's calibrated confidence a pseudo-label needs: the paper keeps ImageNet predictions above 0.3
    min_confidence: float = 0.3
    # students keep the SSL loss on data.unlabeled (true) or learn from labels + pseudo-labels alone (false,
    # the paper's Noisy Student)
    ssl: bool = False
    # the pseudo-labeled set's share beside the human labels in data.labeled (human weight 1);
    # null = one list, every image once per epoch (the paper's combined set)
    pseudo_weight: Optional[float] = None
    # the student's length: this many passes over its labeled set (human + pseudo-labeled), in batches of
    # batch_size (null = train.batch_size x (1 + ssl.mu), the images a teacher's step reads; the labeled
    # batch when the student keeps the SSL loss): the paper's students train longer on the larger set
    epochs: float = 20.0
    batch_size: Optional[int] = None  # the student's global batch; null = as said under epochs
    # the pseudo-labeled set, class-balanced (the paper's): each class's most confident predictions up to
    # per_class, fewer duplicated at random up to it; null = the unlabeled set's size / classes; 0 = unbalanced
    per_class: Optional[int] = None
    # the student's targets: "hard" (the teachers' argmax) or "soft" (their calibrated probabilities;
    # students without the SSL loss)
    targets: Literal["hard", "soft"] = "hard"
    # the pseudo-labels from several teachers: "last" (the round before), or "all" (every earlier round, their
    # calibrated probabilities averaged); plus the exported models or run folders listed in teachers
    ensemble: Literal["last", "all"] = "last"
    teachers: list[str] = field(default_factory=list)  # more teachers: exported models or run folders
    # the student's noise, the paper's: RandAugment on its inputs (data.labeled_view=strong), dropout 0.5
    # before the classifier, stochastic depth 0.2 (its survival probability 0.8 at the last layer)
    strong_view: bool = True
    drop_rate: float = 0.5  # the student's dropout before the classifier (model.drop_rate)
    drop_path_rate: float = 0.2  # the student's stochastic depth (model.drop_path_rate)
    # true: a student of the teacher's architecture starts from the teacher's weights; false (the paper's):
    # from model.pretrained, or from scratch
    init_from_teacher: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)


# Keys that may change between a run and its resumption without breaking it.
RESUMABLE_CHANGES = {
    "train.steps", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints",
    "train.eval_batch_size", "run.log_every", "train.max_bad_fraction", "data.demo_root",
    "deepspeed.timeout_minutes", "run.out_dir", "run.trace_shards", "run.preempt_signals",
    "run.loggers", "data.cache_dir", "data.cache_limit_gb",
    "train.num_workers",  # a resume with other loader readers continues the data exactly (data/position.py)
} | {f"selftrain.{f.name}" for f in dataclasses.fields(SelfTrainConfig)}  # distssl-selftrain's, not a run's


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (), *,
                require_data: bool = True) -> Config:
    """YAML file (optional) + overrides -> validated :class:`Config`; ``require_data`` False lets the data keys
    be unset (a recipe printed before it is filled in: ``--print-config``)."""
    tree: dict = {}
    if path:
        path = resolve_config(path)  # a file, or a recipe shipped in the package by name (demo, cifar10, ...)
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    cfg = build(Config, tree, "")
    validate(cfg, require_data)
    return cfg


REQUIRED_DATA = ("labeled", "unlabeled", "eval")


def unset_data_keys(cfg: Config) -> list[str]:
    return [f"data.{key}" for key in REQUIRED_DATA if not getattr(cfg.data, key)]


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")


def validate(cfg: Config, require_data: bool = True) -> None:
    """Range checks that types alone do not catch. Paths are checked by :func:`check_paths`."""
    s, t, o, d = cfg.ssl, cfg.train, cfg.optim, cfg.data
    _check(0.0 < s.tau <= 1.0, "ssl.tau", s.tau, "0 < tau <= 1")
    _check(s.lambda_u >= 0, "ssl.lambda_u", s.lambda_u, ">= 0 (0 = supervised-only baseline)")
    _check(s.mu >= 1, "ssl.mu", s.mu, "an integer >= 1")
    _check(0.0 <= s.ema_decay < 1.0, "ssl.ema_decay", s.ema_decay, "0 <= decay < 1")
    _check(0.0 <= s.dist_align_momentum < 1.0, "ssl.dist_align_momentum", s.dist_align_momentum, "0 <= m < 1")
    for name in config_sections():
        getattr(s, name).validate(lambda ok, key, value, allowed, name=name:
                                  _check(ok, f"ssl.{name}.{key}", value, allowed))
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", cfg.deepspeed.zero_stage, "0, 1, 2 or 3")
    per_tensor = [k for k in PER_TENSOR_OPTIMIZERS if k in o.name.lower()]
    if per_tensor and cfg.deepspeed.zero_stage > 0:
        raise ConfigError(f"optim.name={o.name} computes per-tensor statistics ({per_tensor[0]}: layer-wise trust "
                          f"ratios, factored or matrix state), but deepspeed.zero_stage={cfg.deepspeed.zero_stage} "
                          "steps the optimizer on flat partitions that mix tensors (measured: tests/"
                          "test_optimizers.py). Use deepspeed.zero_stage=0, or an element-wise optimizer "
                          "(sgd, adamw, lion, ...)")
    _check(cfg.deepspeed.timeout_minutes > 0, "deepspeed.timeout_minutes", cfg.deepspeed.timeout_minutes,
           "> 0 (minutes; fractions allowed)")
    _check(t.steps >= 1, "train.steps", t.steps, ">= 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, ">= 1")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0 = only at the end)")
    _check(t.ckpt_every >= 0, "train.ckpt_every", t.ckpt_every, ">= 0 (0 = only at the end)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    _check(t.num_workers >= 0, "train.num_workers", t.num_workers, ">= 0")
    _check(0.0 <= t.max_bad_fraction <= 1.0, "train.max_bad_fraction", t.max_bad_fraction, "0..1")
    _check(cfg.run.log_every >= 1, "run.log_every", cfg.run.log_every, ">= 1")
    _check(d.cache_limit_gb > 0, "data.cache_limit_gb", d.cache_limit_gb, "> 0 (GB of local disk for cached shards)")
    # here, not at the top: tracking.loggers reads the typed tree (flatten), whose package is this one
    from distssl.tracking.loggers import LOGGERS

    for name in cfg.run.loggers:
        _check(name in LOGGERS, "run.loggers", name, ", ".join(LOGGERS))
    for name in cfg.run.preempt_signals:
        _check(name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT"), "run.preempt_signals", name,
               "SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP or SIGCONT")
    _check(o.lr > 0, "optim.lr", o.lr, "> 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "0 <= momentum < 1")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _check(0.0 <= o.cosine_fraction <= 0.5, "optim.cosine_fraction", o.cosine_fraction, "0..0.5 (7/16 in FixMatch)")
    _check(cfg.model.num_classes >= 2, "model.num_classes", cfg.model.num_classes, ">= 2")
    _check(0.0 <= cfg.model.drop_path_rate < 1.0, "model.drop_path_rate", cfg.model.drop_path_rate, "0..1")
    _check(0.0 <= cfg.model.drop_rate < 1.0, "model.drop_rate", cfg.model.drop_rate, "0..1")
    st = cfg.selftrain
    _check(st.rounds >= 1, "selftrain.rounds", st.rounds, ">= 1 (1 = the configured run alone)")
    _check(0.0 <= st.min_confidence <= 1.0, "selftrain.min_confidence", st.min_confidence, "0..1")
    _check(st.pseudo_weight is None or st.pseudo_weight > 0, "selftrain.pseudo_weight", st.pseudo_weight,
           "> 0, or null (every image once per epoch)")
    _check(0.0 <= st.drop_rate < 1.0, "selftrain.drop_rate", st.drop_rate, "0..1")
    _check(0.0 <= st.drop_path_rate < 1.0, "selftrain.drop_path_rate", st.drop_path_rate, "0..1")
    _check(st.epochs > 0, "selftrain.epochs", st.epochs, "> 0 (passes over the student's labeled set)")
    _check(st.batch_size is None or st.batch_size >= 1, "selftrain.batch_size", st.batch_size, ">= 1, or null")
    _check(st.per_class is None or st.per_class >= 0, "selftrain.per_class", st.per_class,
           ">= 0 (0 = unbalanced), or null (the unlabeled set's size / classes)")
    if st.targets == "soft" and st.ssl:
        raise ConfigError("selftrain.targets=soft trains students without the SSL loss: set selftrain.ssl=false, "
                          "or selftrain.targets=hard")
    _check(t.micro_batch_size >= 0, "train.micro_batch_size", t.micro_batch_size, ">= 0 (0 = no accumulation)")
    _check(cfg.model.freeze_backbone_steps >= 0, "model.freeze_backbone_steps", cfg.model.freeze_backbone_steps, ">= 0")
    _check(o.backbone_lr_scale >= 0, "optim.backbone_lr_scale", o.backbone_lr_scale, ">= 0")
    _check(0.0 < o.layer_decay <= 1.0, "optim.layer_decay", o.layer_decay, "0 < decay <= 1 (1 = off)")
    _check(d.image_size is None or d.image_size >= 8, "data.image_size", d.image_size, ">= 8, or null")
    _check(0.0 <= d.pad_fraction < 0.5, "data.pad_fraction", d.pad_fraction, "0..0.5")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", d.crop_scale,
           "[min, max] with 0 < min <= max <= 1 (fractions of the image area)")
    _check(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", d.crop_ratio,
           "[min, max] aspect ratios with 0 < min <= max")
    _check(d.eval_crop_pct is None or 0 < d.eval_crop_pct <= 1, "data.eval_crop_pct", d.eval_crop_pct,
           "0 < pct <= 1 (0.875 = timm's ImageNet eval), or null")
    _check(d.interleave_shards >= 1, "data.interleave_shards", d.interleave_shards, ">= 1 (1 = one shard at a time)")
    _check(0.0 <= d.cutout_fraction <= 1.0, "data.cutout_fraction", d.cutout_fraction, "0..1")
    _check(d.randaugment_ops >= 0, "data.randaugment_ops", d.randaugment_ops, ">= 0")
    c = d.ctaugment
    _check(c.depth >= 1, "data.ctaugment.depth", c.depth, ">= 1")
    _check(0.0 <= c.threshold <= 1.0, "data.ctaugment.threshold", c.threshold, "0..1")
    _check(0.0 < c.decay < 1.0, "data.ctaugment.decay", c.decay, "0 < decay < 1")
    _check(c.lag >= 0, "data.ctaugment.lag", c.lag, ">= 0 (0 = the loader waits for every step's policy)")
    if d.labeled_targets == "soft" and (s.lambda_u > 0 or d.decode_on == "device"):
        raise ConfigError("data.labeled_targets=soft is read by the supervised step: it needs ssl.lambda_u=0 and "
                          "data.decode_on=loader (or keep data.labeled_targets=hard)")
    if d.strong_aug == "ctaugment" and d.decode_on == "device":
        raise ConfigError("data.strong_aug=ctaugment needs data.decode_on=loader: its probes of the labeled images "
                          "are made in the loader (data.augment_on=device is fine)")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, ">= 1")
    _check(d.mean is None or len(d.mean) == 3, "data.mean", d.mean, "three numbers, or null")
    _check(d.std is None or (len(d.std) == 3 and min(d.std) > 0), "data.std", d.std, "three numbers > 0, or null")
    for key in unset_data_keys(cfg) if require_data else ():
        raise ConfigError(f"{key} is not set: give a shard-set folder/URL with index.json "
                          f"or a brace pattern such as shards/train-{{000000..000009}}.tar")


def check_paths(cfg: Config) -> None:
    """Data paths exist (local ones; remote URLs are checked when opened) and out_dir is writable."""

    for key in ("labeled", "unlabeled", "eval"):
        sources = data_sources(getattr(cfg.data, key))
        for i, (path, _) in enumerate(sources):
            where = f"data.{key}{f'[{i}]' if len(sources) > 1 else ''}"
            if "://" in path and not path.startswith("file://"):
                try:  # its filesystem installed, and credentials for it: said now, in one line
                    store.check_access(path.split("{", 1)[0])
                except (MissingExtra, MissingCredentials) as e:
                    raise type(e)(f"{where}={e}") from None
            problem = describe_missing(path, key)
            if problem:
                raise ConfigError(f"{where}: {problem}")
    if cfg.model.pretrained and "://" not in cfg.model.pretrained and not os.path.exists(cfg.model.pretrained):
        raise ConfigError(f"model.pretrained: {cfg.model.pretrained} does not exist (give a local file or URL)")
    out = Path(cfg.run.out_dir)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"run.out_dir: {cfg.run.out_dir} is not writable ({probe} denies writing)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def redacted_dict(cfg: Config) -> dict:
    """The config as a tree for files and trackers: credentials in URLs replaced."""
    return _redacted(to_dict(cfg))


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (tmp + rename)."""
    atomic.write_text(path, yaml.safe_dump(redacted_dict(cfg), sort_keys=False))


def _redacted(tree: Any) -> Any:
    """Credentials embedded in URLs never reach files on disk."""

    if isinstance(tree, dict):
        return {k: _redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redacted(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree


def resume_conflicts(saved: dict, cfg: Config) -> list[str]:
    """Keys whose values differ from the saved run in a way that breaks resuming it. A key the saved config
    lacks (the run predates it) at its default value is no change: that run behaved as the default."""
    had, defaults = flatten(saved), flatten(redacted_dict(Config()))
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in changed_keys(saved, redacted_dict(cfg), RESUMABLE_CHANGES)
            if k in had or b != defaults.get(k)]
