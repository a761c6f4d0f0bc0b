"""The config tree's sections: each one's keys (with a comment that says what it means, which --keys and
docs/configuration.md print) and its ``validate(check)``, the range checks of its own fields. Checks that
span sections live with the tree (distssl.config.tree.validate)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from distssl.config.coerce import ConfigError
from distssl.data.spec import DataSpec
from distssl.ssl import ALGORITHMS, config_sections

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT")


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

    def validate(self, check) -> None:
        # here, not at the top: tracking.loggers reads the typed tree (flatten), whose package is this one
        from distssl.tracking.loggers import LOGGERS

        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        for name in self.loggers:
            check(name in LOGGERS, "loggers", name, ", ".join(LOGGERS))
        for name in self.preempt_signals:
            check(name in PREEMPT_SIGNALS, "preempt_signals", name, ", ".join(PREEMPT_SIGNALS))


@dataclass
class TrainConfig:
    """The loop: steps, the global batch, evals and checkpoints, loader workers, precision, the weights' EMA and
    how the weak view is forwarded."""

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
    # EMA of the weights, evaluated and exported (Mean Teacher's teacher too)
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, 1 - (1 + step) ** -0.75) (timm): early EMA follows the model
    # "shared_bn": labeled + strong forwarded with gradients, the weak view without (it only makes
    # pseudo-labels), normalised with the BatchNorm statistics of that forward: it skips the weak
    # view's backward, which "concat" (FixMatch's reference cat(labeled, weak, strong) forward with
    # gradients) pays; step times and the demo's top-1 over seeds: docs/benchmarks.md
    weak_forward: Literal["shared_bn", "concat"] = "shared_bn"

    def validate(self, check) -> None:
        check(self.steps >= 1, "steps", self.steps, ">= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0 (0 = only at the end)")
        check(self.ckpt_every >= 0, "ckpt_every", self.ckpt_every, ">= 0 (0 = only at the end)")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, ">= 1")
        check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        check(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", self.max_bad_fraction, "0..1")
        check(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, ">= 0 (0 = no accumulation)")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "0 <= decay < 1")


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
    # images outside the label set in the unlabeled data: "iomatch" (its keys: ssl.iomatch) adds an outlier head,
    # keeps outliers out of the pseudo-labels and trains them as a (K+1)-th class; pseudo-label rules only
    open_set: Literal["none", "iomatch"] = "none"
    # long-tailed classes: "abc" or "acr" (keys: ssl.abc, ssl.acr) add a balanced classifier, which the run
    # evaluates and exports; pseudo-label rules only
    imbalance: Literal["none", "abc", "acr"] = "none"

    def validate(self, check) -> None:
        check(0.0 < self.tau <= 1.0, "tau", self.tau, "0 < tau <= 1")
        check(self.lambda_u >= 0, "lambda_u", self.lambda_u, ">= 0 (0 = supervised-only baseline)")
        check(self.mu >= 1, "mu", self.mu, "an integer >= 1")
        check(0.0 <= self.dist_align_momentum < 1.0, "dist_align_momentum", self.dist_align_momentum, "0 <= m < 1")
        for name in config_sections():  # each algorithm's own section, beside its fields in its file
            getattr(self, name).validate(lambda ok, key, value, allowed, name=name:
                                         check(ok, f"{name}.{key}", value, allowed))


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

    def validate(self, check) -> None:
        check(self.num_classes >= 2, "num_classes", self.num_classes, ">= 2")
        check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", self.drop_path_rate, "0..1")
        check(0.0 <= self.drop_rate < 1.0, "drop_rate", self.drop_rate, "0..1")
        check(self.freeze_backbone_steps >= 0, "freeze_backbone_steps", self.freeze_backbone_steps, ">= 0")


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

    def validate(self, check) -> None:
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "0 <= momentum < 1")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(0.0 <= self.cosine_fraction <= 0.5, "cosine_fraction", self.cosine_fraction, "0..0.5 (7/16 in FixMatch)")
        check(self.backbone_lr_scale >= 0, "backbone_lr_scale", self.backbone_lr_scale, ">= 0")
        check(0.0 < self.layer_decay <= 1.0, "layer_decay", self.layer_decay, "0 < decay <= 1 (1 = off)")


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

    def validate(self, check) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "0, 1, 2 or 3")
        check(self.timeout_minutes > 0, "timeout_minutes", self.timeout_minutes, "> 0 (minutes; fractions allowed)")


@dataclass
class CTAugmentConfig:
    """CTAugment's policy (data.strong_aug=ctaugment): defaults of FixMatch's libml/ctaugment.py."""
    depth: int = 2  # ops per strong view (and per probe)
    threshold: float = 0.85  # bins weighted under this fraction of the op's best are not drawn
    decay: float = 0.99  # each probe moves its bins' weights by 1 - decay towards its proximity
    # the batch of step s is drawn with the policy of step s - lag, so loader workers may run this many
    # batches ahead without waiting for it (and a resume draws the same views)
    lag: int = 32

    def validate(self, check) -> None:
        check(self.depth >= 1, "depth", self.depth, ">= 1")
        check(0.0 <= self.threshold <= 1.0, "threshold", self.threshold, "0..1")
        check(0.0 < self.decay < 1.0, "decay", self.decay, "0 < decay < 1")
        check(self.lag >= 0, "lag", self.lag, ">= 0 (0 = the loader waits for every step's policy)")


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

    def validate(self, check) -> None:
        check(self.cache_limit_gb > 0, "cache_limit_gb", self.cache_limit_gb,
              "> 0 (GB of local disk for cached shards)")
        check(self.image_size is None or self.image_size >= 8, "image_size", self.image_size, ">= 8, or null")
        check(0.0 <= self.pad_fraction < 0.5, "pad_fraction", self.pad_fraction, "0..0.5")
        check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
              self.crop_scale, "[min, max] with 0 < min <= max <= 1 (fractions of the image area)")
        check(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio",
              self.crop_ratio, "[min, max] aspect ratios with 0 < min <= max")
        check(self.eval_crop_pct is None or 0 < self.eval_crop_pct <= 1, "eval_crop_pct", self.eval_crop_pct,
              "0 < pct <= 1 (0.875 = timm's ImageNet eval), or null")
        check(self.interleave_shards >= 1, "interleave_shards", self.interleave_shards,
              ">= 1 (1 = one shard at a time)")
        check(0.0 <= self.cutout_fraction <= 1.0, "cutout_fraction", self.cutout_fraction, "0..1")
        check(self.randaugment_ops >= 0, "randaugment_ops", self.randaugment_ops, ">= 0")
        self.ctaugment.validate(lambda ok, key, value, allowed: check(ok, f"ctaugment.{key}", value, allowed))
        if self.strong_aug == "ctaugment" and self.decode_on == "device":
            raise ConfigError("data.strong_aug=ctaugment needs data.decode_on=loader: its probes of the labeled "
                              "images are made in the loader (data.augment_on=device is fine)")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, ">= 1")
        check(self.mean is None or len(self.mean) == 3, "mean", self.mean, "three numbers, or null")
        check(self.std is None or (len(self.std) == 3 and min(self.std) > 0), "std", self.std,
              "three numbers > 0, or null")


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

    def validate(self, check) -> None:
        check(self.rounds >= 1, "rounds", self.rounds, ">= 1 (1 = the configured run alone)")
        check(0.0 <= self.min_confidence <= 1.0, "min_confidence", self.min_confidence, "0..1")
        check(self.pseudo_weight is None or self.pseudo_weight > 0, "pseudo_weight", self.pseudo_weight,
              "> 0, or null (every image once per epoch)")
        check(0.0 <= self.drop_rate < 1.0, "drop_rate", self.drop_rate, "0..1")
        check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", self.drop_path_rate, "0..1")
        check(self.epochs > 0, "epochs", self.epochs, "> 0 (passes over the student's labeled set)")
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", self.batch_size, ">= 1, or null")
        check(self.per_class is None or self.per_class >= 0, "per_class", self.per_class,
              ">= 0 (0 = unbalanced), or null (the unlabeled set's size / classes)")
        if self.targets == "soft" and self.ssl:
            raise ConfigError("selftrain.targets=soft trains students without the SSL loss: set selftrain.ssl=false, "
                              "or selftrain.targets=hard")
