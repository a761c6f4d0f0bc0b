#!/usr/bin/env python
"""Two-view (weak + strong) training stream throughput, against the machine's limit and ImageFolder.

- limit: the same decode + weak + strong views in a tight loop, one process per core running at
  the same time, rates summed (on SMT or shared-budget cores that is less than cores x one loop);
- distssl: TrainStream over WebDataset shards through a DataLoader with one worker per core;
- ImageFolder: torchvision ImageFolder + DataLoader (shuffle, one worker per core) over the raw files,
  producing the same two views; over S3 its equivalent is a map-style dataset that GETs one object
  per image (what a folder dataset does on a bucket).
All on the same real images (MNIST digits upscaled to JPEGs), measured one after the other here.

  python tools/bench/stream.py [--quick] [--count N] [--s3]
  python tools/bench/stream.py --imagenet [--quick] [--step-ms MS]

--imagenet: photo JPEGs at ImageNet's sizes (random crops of scikit-learn's two real photos,
re-encoded at 500x375 / 375x500, and the same built with each --max-size in --max-sizes), the
ImageNet recipe's 224-px views (one random-resized crop, bicubic, as the base of both views), and the
CPU a GPU's feed costs: everything a loader worker does per labeled and per unlabeled sample (tar
read, shard mixing, shuffle, decode, crop, views, collate; one thread), times the images one GPU
consumes per step (32 labeled + 32 x mu unlabeled) over --step-ms. Options: the loader path,
``device_*`` (data.augment_on=device: workers decode and crop only), ``decode_device_*``
(data.decode_on=device: workers read, parse the JPEG header and draw the crop and view choices; the
trainer decodes), ``k8_*`` / ``k8_device_*`` (a weak and K = 8 strong views of each unlabeled image, as
ReMixMatch's augmentation anchoring asks: in the loader, or their plans for the device), ``pad_orig``
(the old CIFAR-style path at 224 px, for comparison); and the trainer's
own time per step with decode_on=device on this machine's device. Ends with RESULT
cores_per_gpu=<the recipe's shards, loader path> cores_per_gpu_decode_device=<the same shards, decoded
on the device> cores_per_gpu_<option>=... trainer_decode_ms_per_step=...

Also: the CPU cost of handing one batch from a worker to the trainer, torch's DataLoader hand-over
against distssl's shared-memory ring (distssl/data/ring.py); the CPU per sample of the stream with
webdataset's tar stage in place of distssl's reader; with --s3, a data.cache_dir's first epoch
(fetching from the bucket through a proxy adding --latency-ms per request) against its second (local).

Ends with: RESULT stream_img_s=... limit_img_s=... stream_vs_limit=... imagefolder_img_s=...
stream_vs_imagefolder=... handover_ms_dataloader=... handover_ms_ring=... tar_ms_lean=...
tar_ms_webdataset=... webdataset_tar_cost=...
[s3_stream_img_s=... s3_imagefolder_img_s=... s3_stream_vs_imagefolder=... cache_epoch1_img_s=...
cache_epoch2_img_s=... cache_epoch2_vs_epoch1=...]
[gpu_feed_img_s_dataloader=... gpu_feed_img_s_ring=...: with CUDA, batches copied to the GPU from pinned memory]
"""
import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import IterableDataset

from common import machine, photo_jpegs, real_images, result, s3_server, table, upload_folder


class TwoViews:
    """The same per-image work as the stream (decode once, weak + strong views), for ImageFolder."""

    def __init__(self, views):
        self.views = views

    def __call__(self, data: bytes):
        from distssl.data.transforms import decode
        rng = random.Random()
        img = decode(data, self.views.image_size)
        return self.views.weak(img, rng), self.views.strong(img, rng)


class BytesFolder:
    """torchvision ImageFolder that hands file bytes to the transform (decode happens in TwoViews)."""

    def __new__(cls, root, transform):
        from torchvision.datasets import ImageFolder
        return ImageFolder(root, transform=transform, loader=lambda p: open(p, "rb").read())


class S3Objects:
    """One GET per image from a bucket: the folder-dataset way to read object storage."""

    def __init__(self, urls, transform):
        self.urls, self.transform = urls, transform

    def __len__(self):
        return len(self.urls)

    def __getitem__(self, i):
        from distssl.storage import store
        return self.transform(store.read_bytes(self.urls[i])), 0


def _loop(args):
    datas, views, barrier, repeat = args
    from distssl.data.transforms import decode
    rng = random.Random(0)
    for d in datas[:50]:  # warm-up: page faults, allocator growth
        img = decode(d, views.image_size)
        views.weak(img, rng), views.strong(img, rng)
    barrier.wait()
    t = time.perf_counter()
    for _ in range(repeat):
        for d in datas:
            img = decode(d, views.image_size)
            views.weak(img, rng), views.strong(img, rng)
    return repeat * len(datas), time.perf_counter() - t


def loop_limit(datas, views, workers, repeat=1):
    """Summed rate of `workers` loops running at the same time (on SMT or shared-budget cores that
    is less than cores x one loop)."""
    import multiprocessing as mp

    import torch

    torch.set_num_threads(1)
    ctx = mp.get_context("fork")
    with ctx.Manager() as m:
        barrier = m.Barrier(workers)
        with ctx.Pool(workers) as pool:
            results = pool.map(_loop, [(datas, views, barrier, repeat)] * workers)
    return sum(n for n, _ in results) / max(t for _, t in results)


def loop_alone(datas, views):
    import multiprocessing as mp
    n, t = _loop((datas, views, mp.get_context("fork").Barrier(1), 1))
    return n / t


class SameBatch(IterableDataset):
    """A stream that repeats one batch's items: isolates the cost of handing batches over."""

    def __init__(self, batch, image_size):
        import torch
        self.items = [{"weak": torch.zeros(3, image_size, image_size, dtype=torch.uint8),
                       "strong": torch.zeros(3, image_size, image_size, dtype=torch.uint8), "y_true": 0}
                      for _ in range(batch)]

    def __iter__(self):
        from distssl.data.streams import collate
        return self.batches(collate)

    def batches(self, pack):
        while True:
            b = pack(self.items)
            b["worker"], b["cursor"], b["skipped"] = 0, 0, 0
            yield b


def handover_ms(batch, image_size, ring, batches):
    """(worker CPU ms, training-process CPU ms) per batch to hand a batch from 1 worker over."""
    import psutil

    from distssl.data.streams import loader

    ds = SameBatch(batch, image_size)
    before = {p.pid for p in psutil.Process().children()}
    it = iter(loader(ds, 1, ring=ring))  # ring=False: torch's DataLoader, pinning batches when CUDA is present
    for _ in range(10):
        next(it)
    (worker,) = [p for p in psutil.Process().children() if p.pid not in before]
    w0, m0 = sum(worker.cpu_times()[:2]), time.process_time()
    for _ in range(batches):
        next(it)
    w, m = sum(worker.cpu_times()[:2]) - w0, time.process_time() - m0
    del it
    return 1e3 * w / batches, 1e3 * m / batches


def to_gpu(loader):
    """Every batch copied to the GPU as the trainer does it (non_blocking, from page-locked memory)."""
    import torch

    for b in loader:
        yield {k: v.to("cuda", non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def rate(loader, images_per_batch, batches, warmup=2, sync=lambda: None):
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    sync()
    return images_per_batch * batches / (time.perf_counter() - t)


def cpu_ms_per_sample(spec: str, make_item, batch: int, batches: int, interleave_shards: int) -> float:
    """CPU ms per sample of everything a loader worker does (tar read, shard mixing, shuffle, decode,
    crop, views, collate), measured in this process with one thread as a worker runs it."""
    from distssl.data.index import resolve
    from distssl.data.streams import TrainStream

    stream = iter(TrainStream(resolve(spec), rank=0, world_size=1, batch_size=batch, seed=0, shuffle_buffer=256,
                              make_item=make_item, interleave_shards=interleave_shards))
    next(stream)  # warm-up: first shards opened, allocator grown
    t = time.process_time()
    for _ in range(batches):
        next(stream)
    return 1e3 * (time.process_time() - t) / (batches * batch)


def stage_ms(datas: list[bytes], views, reps: int = 2) -> dict[str, float]:
    """Where one unlabeled sample's time goes: decode, crop + resize, weak view, strong view."""
    import io as _io

    from PIL import Image

    def per(f):
        t = time.process_time()
        for _ in range(reps):
            for d in datas:
                f(d)
        return 1e3 * (time.process_time() - t) / (reps * len(datas))

    rng = random.Random(0)
    base = [views.base(d, rng) for d in datas]
    it = itertools.cycle(base)
    decode = per(lambda d: Image.open(_io.BytesIO(d)).convert("RGB"))
    return {"decode (full, for reference)": decode, "decode + crop + resize (base)": per(lambda d: views.base(d, rng)),
            "weak view": per(lambda d: views.weak(next(it), rng)),
            "strong view": per(lambda d: views.strong(next(it), rng))}


def device_views_ms(views, batch: int, rounds: int = 3) -> float:
    """ms to make a batch's weak + strong views from base crops on this machine's default device."""
    import torch

    from distssl.data import device_augment as dev

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.randint(0, 256, (batch, 3, views.image_size, views.image_size), dtype=torch.uint8, device=device)
    rng = random.Random(0)
    plans = [(dev.weak_plan(views, rng), dev.strong_plan(views, rng)) for _ in range(batch)]
    weak, strong = torch.tensor([p[0] for p in plans]), torch.tensor([p[1] for p in plans])
    times = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        dev.apply_weak(base, weak, 0), dev.apply_strong(base, strong, 0, views.randaugment_ops, views.cutout_fraction)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[1:])


def device_decode_ms(sets: dict, views, lab_batch: int, unl_batch: int, recipe_max_size: int,
                     rounds: int = 3) -> dict:
    """ms the trainer spends per step with data.decode_on=device: one labeled and one unlabeled batch of
    the recipe's shards decoded (batched decode_jpeg), cropped, resized and made into their views, on
    this machine's default device."""
    import torch

    from distssl.data import device_augment as dev
    from distssl.data.device_decode import decode_batch
    from distssl.data.index import resolve
    from distssl.data.samples import labeled_encoded_item, unlabeled_encoded_item
    from distssl.data.streams import TrainStream

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = sets.get(f"max{recipe_max_size}", sets["orig"])
    batches = []
    for which, make, n in (("labeled", labeled_encoded_item(views), lab_batch),
                           ("unlabeled", unlabeled_encoded_item(views), unl_batch)):
        stream = TrainStream(resolve(str(folder / which)), rank=0, world_size=1, batch_size=n, seed=0,
                             shuffle_buffer=64, make_item=make)
        batches.append(next(iter(stream)))
    pad = dev.pad_pixels(views)
    times = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        for b in batches:
            base, _ = decode_batch(b["bytes_image"], b["bytes_image_lengths"], b["decoded"], b["box"],
                                   views.image_size, views.interpolation, device)
            for name in [k for k in b if k.startswith("plan_")]:
                if name == "plan_strong":
                    dev.apply_strong(base, b[name].to(device), pad, views.randaugment_ops, views.cutout_fraction)
                else:
                    dev.apply_weak(base, b[name].to(device), pad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"ms": 1e3 * statistics.median(times[1:]), "device": str(device)}


def imagenet(a) -> int:
    """ImageNet mode: photo JPEGs at ImageNet's sizes, 224-px views, the CPU a GPU's feed costs."""
    import torch

    from distssl.data.samples import (
        labeled_encoded_item,
        labeled_item,
        unlabeled_encoded_item,
        unlabeled_item,
        unlabeled_plan_item,
    )
    from distssl.data.transforms import Views
    from distssl.shards import ImageOptions, make_shards
    from distssl.ssl import views_of
    from distssl.storage import store

    torch.set_num_threads(1)  # as in a loader worker
    count = a.count or (480 if a.quick else 2000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-imagenet-"))
    photo_jpegs(tmp / "raw", count)
    sizes = [None] + [int(x) for x in a.max_sizes.split(",") if x]
    sets = {}
    for size in sizes:
        name = "orig" if size is None else f"max{size}"
        make_shards(str(tmp / "raw"), str(tmp / name), labels_per_class=max(1, count // 40),
                    max_count=max(20, count // 24),
                    image=ImageOptions(max_size=size, format="jpg" if size else None), progress=False)
        sets[name] = tmp / name
    recipe = dict(crop="random_resized", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic")
    pipelines = {"": Views(224, **recipe), "device": Views(224, **recipe), "decode_device": Views(224, **recipe),
                 "pad": Views(224, flip=True, pad_fraction=0.125, crop="pad", interpolation="bilinear")}
    pipelines.update({"k8": Views(224, **recipe), "k8_device": Views(224, **recipe)})
    eight = ("weak",) + views_of("strong", 8)  # ReMixMatch's K = 8 strong views and the weak one, from one decode
    builders = {"device": (labeled_item, unlabeled_plan_item),
                "decode_device": (lambda v: labeled_encoded_item(v), unlabeled_encoded_item),
                "k8": (labeled_item, lambda v: unlabeled_item(v, wanted=eight)),
                "k8_device": (labeled_item, lambda v: unlabeled_plan_item(v, wanted=eight))}
    lab_batch, unl_batch = a.micro_batch, a.micro_batch * a.mu
    step_s = a.step_ms / 1e3
    batches = 3 if a.quick else 10
    rows, cores, detail = [], {}, {}
    for name, folder in sets.items():
        for pname, views in pipelines.items():
            if pname == "pad" and name != "orig":
                continue  # the old path, once, for comparison
            if pname.startswith("k8") and name != f"max{a.recipe_max_size}":
                continue  # K views: on the recipe's shards only
            key = f"{pname}_{name}" if pname else name
            make_labeled, make_unlabeled = builders.get(pname, (labeled_item, unlabeled_item))
            lab = cpu_ms_per_sample(str(folder / "labeled"), make_labeled(views), lab_batch, 4 * batches, 16)
            unl = cpu_ms_per_sample(str(folder / "unlabeled"), make_unlabeled(views), unl_batch, batches, 16)
            need = (lab_batch * lab + unl_batch * unl) / 1e3 / step_s  # CPU seconds per second per GPU
            cores[f"cores_per_gpu_{key}"] = need
            kb = sum(s["bytes"] for s in json.loads((folder / "unlabeled/index.json").read_text())["shards"]) / 1e3
            rows.append((key, f"{kb / count:.0f} KB", f"{lab:.2f}", f"{unl:.2f}", f"{need:.1f}"))
        originals = sorted((tmp / "raw").rglob("*.jpg"))[:60]
        datas = [store.read_bytes(str(p)) for p in originals] if name == "orig" else None
        if datas is None:  # the same stage profile on the resized shards' own bytes
            from distssl.data.streams import tar_samples
            first = tar_samples(str(folder / "unlabeled/shard-000000.tar"))
            datas = [r.fields["jpg"] for _, r in zip(range(60), first)]
        detail[name] = stage_ms(datas, pipelines[""])
    print(f"machine: {machine()}; {count} photo JPEGs (~500x375) -> 224 px, per GPU and step: "
          f"{lab_batch} labeled + {unl_batch} unlabeled (mu {a.mu}) in {a.step_ms} ms")
    table(rows, ("shards / pipeline", "bytes/img", "labeled ms", "unlabeled ms", "cores per GPU"))
    print("\nwhere one unlabeled sample's time goes (ms, one core):")
    stages = list(next(iter(detail.values())))
    table([(st, *(f"{detail[n][st]:.2f}" for n in detail)) for st in stages], ("stage", *detail))
    device_ms = device_views_ms(pipelines["device"], unl_batch)
    print(f"\naugment_on=device: the views of {unl_batch} unlabeled images made on this machine's CPU in "
          f"{device_ms:.0f} ms ({device_ms / unl_batch:.2f} ms per image, one thread); on a GPU this is "
          f"device time, measured by tools/bench/gpu_check.sh")
    decode_ms = device_decode_ms(sets, pipelines["decode_device"], lab_batch, unl_batch, a.recipe_max_size)
    print(f"decode_on=device: the trainer's side of one step ({lab_batch} + {unl_batch} images: batched decode_jpeg, "
          f"crops, resizes and the views) on this machine's {decode_ms['device']}: {decode_ms['ms']:.0f} ms "
          f"({decode_ms['ms'] / (lab_batch + unl_batch):.2f} ms per image, {torch.get_num_threads()} thread(s)); "
          "on a CPU-only machine that is the training process's time, so keep data.decode_on=loader there")
    recipe_key = f"cores_per_gpu_max{a.recipe_max_size}"
    result(cores_per_gpu=cores.get(recipe_key, cores["cores_per_gpu_orig"]),
           cores_per_gpu_decode_device=cores.get(f"cores_per_gpu_decode_device_max{a.recipe_max_size}",
                                                 cores["cores_per_gpu_decode_device_orig"]),
           **cores, step_ms=a.step_ms, labeled_per_step=lab_batch, unlabeled_per_step=unl_batch,
           trainer_decode_ms_per_step=decode_ms["ms"])
    return 0


def cached_epochs(endpoint: str, spec: str, cache_dir: Path, views, a) -> tuple[float, float]:
    """img/s of a stream's first epoch (shards fetched from the store into data.cache_dir) and of its
    second (read from the cache), through a proxy that adds --latency-ms to every request."""
    import s3fs

    from distssl.data.index import resolve
    from distssl.data.samples import unlabeled_item
    from distssl.data.streams import TrainStream, loader
    from distssl.storage.cache import ShardCache
    from support.servers import TcpProxy

    proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]), latency=a.latency_ms / 1000)
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        shards = resolve(spec)
        shards.cache = ShardCache(str(cache_dir), limit_gb=10)
        per_epoch = sum(shards.counts) // a.batch
        ds = TrainStream(shards, rank=0, world_size=1, batch_size=a.batch, seed=0, shuffle_buffer=256,
                         make_item=unlabeled_item(views))
        batches = iter(loader(ds, a.workers))
        rates = []
        for _ in range(2):
            t = time.perf_counter()
            for _ in range(per_epoch):
                next(batches)
            rates.append(per_epoch * a.batch / (time.perf_counter() - t))
        del batches
        print(f"data.cache_dir over s3:// with {a.latency_ms:g} ms per request: epoch 1 {rates[0]:.0f} img/s "
              f"(fetching), epoch 2 {rates[1]:.0f} img/s (cached): {rates[1] / rates[0]:.2f}x", flush=True)
        return rates[0], rates[1]
    finally:
        proxy.down()
        os.environ["AWS_ENDPOINT_URL"] = saved
        s3fs.S3FileSystem.clear_instance_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (under a minute)")
    p.add_argument("--imagenet", action="store_true",
                   help="ImageNet mode: photo JPEGs at ImageNet's sizes, the recipe's 224-px views, and the loader "
                        "cores one GPU needs (cores_per_gpu_<shards>) at --step-ms")
    p.add_argument("--step-ms", type=float, default=80.7,
                   help="--imagenet: GPU step time (default: the ResNet-50 step measured on an H200)")
    p.add_argument("--micro-batch", type=int, default=32, help="--imagenet: labeled images per GPU and step (32)")
    p.add_argument("--mu", type=int, default=5, help="--imagenet: unlabeled ratio (5, the ImageNet recipe's)")
    p.add_argument("--max-sizes", default="320,256", help="--imagenet: shard sets built with these --max-size values")
    p.add_argument("--recipe-max-size", type=int, default=320,
                   help="--imagenet: the --max-size configs/imagenet.yaml builds with (its cores_per_gpu)")
    p.add_argument("--count", type=int, help="images (default 4000, 2800 with --quick)")
    p.add_argument("--size", type=int, default=96, help="source JPEG side (default 96)")
    p.add_argument("--image-size", type=int, default=64, help="training input side (default 64)")
    p.add_argument("--batch", type=int, default=64, help="unlabeled batch per step (default 64)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers (default: cores)")
    p.add_argument("--rounds", type=int, help="(limit, stream, ImageFolder) rounds (default 8, 5 with --quick)")
    p.add_argument("--s3", action="store_true", help="also stream from a local S3 server (moto), and measure a "
                                                     "data.cache_dir's second epoch against its first")
    p.add_argument("--latency-ms", type=float, default=40.0,
                   help="--s3: latency a TCP proxy adds to each request for the cache epochs (default 40 ms, a "
                        "bucket in another region; the same region is ~10-20)")
    a = p.parse_args(argv)
    if a.imagenet:
        return imagenet(a)
    count = a.count or (2800 if a.quick else 4000)

    import torch
    from torch.utils.data import DataLoader

    from distssl.data.index import resolve
    from distssl.data.samples import unlabeled_item
    from distssl.data.streams import TrainStream, loader
    from distssl.data.transforms import Views
    from distssl.shards import make_shards
    from distssl.storage import store

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    paths = real_images(tmp / "raw", count, a.size)
    per_shard = max(50, count // (4 * a.workers))
    make_shards(str(tmp / "raw"), str(tmp / "shards"), unlabeled=True, max_count=per_shard, progress=False)
    views = Views(a.image_size, flip=True, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5)

    n_limit = min(count, 600)
    datas = [store.read_bytes(str(p)) for p in paths[:n_limit]]
    batches = max(4, min(40 if a.quick else 60, count // a.batch - 3))  # ImageFolder's epoch is finite
    rounds = a.rounds or (5 if a.quick else 8)

    def stream_rate(spec, ring=True, cuda=False):
        ds = TrainStream(resolve(spec), rank=0, world_size=1, batch_size=a.batch, seed=0, shuffle_buffer=256,
                         make_item=unlabeled_item(views))
        batches_of = loader(ds, a.workers, ring=ring)
        if cuda:
            return rate(to_gpu(batches_of), a.batch, batches, sync=torch.cuda.synchronize)
        return rate(batches_of, a.batch, batches)

    def folder_rate(ds):
        dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, prefetch_factor=4,
                        persistent_workers=False)
        return rate(dl, a.batch, batches)

    # Rounds of (limit, stream, ImageFolder), windows of about the same length: this VM's speed
    # drifts by +-10% within seconds, so each ratio pairs windows measured next to each other and
    # the reported ratio is the median over rounds (one disturbed window cannot move it).
    folder_ds = BytesFolder(str(tmp / "raw"), TwoViews(views))
    per_core = loop_alone(datas, views)
    repeat = max(1, round(batches * a.batch / a.workers / len(datas)))
    per_round = []
    for r in range(rounds):
        lim = loop_limit(datas, views, a.workers, repeat)
        per_round.append((lim, stream_rate(str(tmp / "shards")), folder_rate(folder_ds)))
        print(f"round {r + 1}/{rounds}: limit {lim:.0f}  stream {per_round[-1][1]:.0f}  "
              f"ImageFolder {per_round[-1][2]:.0f} img/s", flush=True)
    limit, stream, folder = (statistics.mean(x[i] for x in per_round) for i in range(3))
    vs_limit = statistics.median(s_ / l_ for l_, s_, _ in per_round)
    folder_vs_limit = statistics.median(f_ / l_ for l_, _, f_ in per_round)
    vs_folder = statistics.median(s_ / f_ for _, s_, f_ in per_round)
    gpu = {}
    if torch.cuda.is_available():
        # on a GPU the trainer copies batches to the device from page-locked memory: the ring's
        # copy-out into pinned memory (the default) against DataLoader's pin-memory thread
        feed = {"dataloader": [], "ring": []}
        for _ in range(3):
            for name in feed:
                feed[name].append(stream_rate(str(tmp / "shards"), ring=name == "ring", cuda=True))
        gpu = {f"gpu_feed_img_s_{k}": statistics.median(v) for k, v in feed.items()}
        print(f"to {torch.cuda.get_device_name()}, median of 3: DataLoader + pin thread "
              f"{gpu['gpu_feed_img_s_dataloader']:.0f} img/s, ring + pinned copy-out {gpu['gpu_feed_img_s_ring']:.0f}")
    # the tar stage: distssl's lean reader against webdataset's tar_file_iterator beneath the same
    # stream (shard mixing, shuffle, decode, views), CPU per sample in alternating rounds
    import distssl.data.streams as streams
    from distssl.data.tar import tar_members, webdataset_members

    per_reader = {"lean": [], "webdataset": []}
    for _ in range(3 if a.quick else 5):
        for name, members in (("lean", tar_members), ("webdataset", webdataset_members)):
            streams.tar_members = members
            per_reader[name].append(cpu_ms_per_sample(str(tmp / "shards"), unlabeled_item(views), a.batch,
                                                      max(4, batches // 2), 4))
    streams.tar_members = tar_members
    lean_ms, wds_ms = (statistics.median(per_reader[k]) for k in ("lean", "webdataset"))
    print(f"tar stage beneath the stream, CPU ms per sample (median): distssl's reader {lean_ms:.3f}, "
          f"webdataset's tar_file_iterator {wds_ms:.3f} ({100 * (wds_ms / lean_ms - 1):+.1f}% of the stream)")
    # where the loader's own time goes: handing one batch from a worker to the trainer
    n_hand = 150 if a.quick else 400
    std_w, std_m = handover_ms(a.batch, a.image_size, False, n_hand)
    ring_w, ring_m = handover_ms(a.batch, a.image_size, True, n_hand)
    print(f"hand-over of one {a.batch}-image two-view batch, CPU ms (worker + trainer): DataLoader's "
          f"{std_w:.2f} + {std_m:.2f}, distssl ring {ring_w:.2f} + {ring_m:.2f}")
    rows = [("decode + weak + strong loop, 1 process alone", f"{per_core:.0f}", "", ""),
            (f"limit: {a.workers} loops at once, summed", f"{limit:.0f}", "1.00", ""),
            ("distssl stream, local shards", f"{stream:.0f}", f"{vs_limit:.2f}", f"{vs_folder:.2f}"),
            ("ImageFolder + DataLoader, local", f"{folder:.0f}", f"{folder_vs_limit:.2f}", "1.00")]
    extra = {}
    if a.s3:
        with s3_server() as endpoint:
            upload_folder(tmp / "shards", "bench", "shards/")
            upload_folder(tmp / "raw", "bench", "raw/")
            s3_stream = stream_rate("s3://bench/shards")
            urls = [f"s3://bench/raw/{p.relative_to(tmp / 'raw')}" for p in paths]
            s3_folder = folder_rate(S3Objects(urls, TwoViews(views)))
            cold, warm = cached_epochs(endpoint, "s3://bench/shards", tmp / "cache", views, a)
        rows += [("distssl stream, s3:// shards", f"{s3_stream:.0f}", f"{s3_stream / limit:.2f}",
                  f"{s3_stream / s3_folder:.2f} (vs S3 objects)"),
                 ("one GET per image, s3://", f"{s3_folder:.0f}", f"{s3_folder / limit:.2f}", "1.00")]
        rows += [(f"s3:// + {a.latency_ms:g} ms/request, data.cache_dir: epoch 1 (fetching)", f"{cold:.0f}",
                  f"{cold / limit:.2f}", ""),
                 (f"s3:// + {a.latency_ms:g} ms/request, data.cache_dir: epoch 2 (cached)", f"{warm:.0f}",
                  f"{warm / limit:.2f}", f"{warm / cold:.2f} (vs epoch 1)")]
        extra = {"s3_stream_img_s": s3_stream, "s3_imagefolder_img_s": s3_folder,
                 "s3_stream_vs_imagefolder": s3_stream / s3_folder, "cache_epoch1_img_s": cold,
                 "cache_epoch2_img_s": warm, "cache_epoch2_vs_epoch1": warm / cold}
    print(f"machine: {machine()}; {count} JPEGs {a.size}px -> {a.image_size}px, weak + strong views, "
          f"batch {a.batch}, {a.workers} loader workers")
    table(rows, ("what", "img/s", "vs limit", "vs ImageFolder"))
    print(f"img/s: means over {rounds} rounds; ratios: medians of the per-round ratios")
    result(stream_img_s=stream, limit_img_s=limit, stream_vs_limit=vs_limit, imagefolder_img_s=folder,
           stream_vs_imagefolder=vs_folder, handover_ms_dataloader=std_w + std_m, handover_ms_ring=ring_w + ring_m,
           tar_ms_lean=lean_ms, tar_ms_webdataset=wds_ms, webdataset_tar_cost=wds_ms / lean_ms - 1,
           **extra, **gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
