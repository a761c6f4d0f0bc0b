#!/usr/bin/env bash
# The GPU checks, in one short run on a GPU node (each part has its own time limit, so one that hangs
# cannot eat the others):
#   1. tools/bench/gpu_step.py   ResNet-50 at 224 px in bf16: shared_bn vs concat vs supervised step
#   2. tools/bench/stream.py     the stream with all the node's cores, and its batches copied to the
#                                GPU: DataLoader's pin-memory thread against the ring's pinned copy-out
#   3. tools/bench/stream.py --imagenet   loader cores per GPU at 224 px on photo JPEGs, and the
#                                time data.augment_on=device's views take on the GPU
#   4. tools/bench/predict.py    distssl-predict's img/s on the GPU (ResNet-50 at 224 px) against the eval
#                                loop over the same photo JPEGs, decoded in the process and by 8 workers
#   5. feed: the ImageNet recipe (ResNet-50, 224 px, bf16, 32 + 160 + 160 per step) trained for 30 steps on
#      photo-JPEG shards, with 4 and with 16 loader workers, decoding in the loader and on the GPU
#      (data.decode_on=device): end-to-end img/s each (metrics.jsonl's img_s)
#   6. the demo, trained on the GPU through DeepSpeed's launcher (nccl, one rank), then the same with
#      data.crop=random_resized at 64 px and data.augment_on=device
# Logs and the demo's summary go to $OUT (default runs/gpu-check).
#
#   bash tools/bench/gpu_check.sh [step] [stream] [imagenet] [predict] [feed] [demo]     (default: all six;
#   ~14 min in all: give it one part at a time when less device time is left)
# On a node without deepspeed/timm/mlxtend installed, put wheels in .whl/ first; they are installed
# to /tmp/site (no network needed).
set -u
PARTS=" ${*:-step stream imagenet predict feed demo} "
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  python3 -c "import torch, deepspeed, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if [[ $PARTS == *" step "* ]]; then
  echo "== gpu_step"
  timeout 150 python3 tools/bench/gpu_step.py --profile 2>&1 | tail -120 | tee "$OUT/gpu_step.log"
fi
if [[ $PARTS == *" stream "* ]]; then
  echo "== stream"
  timeout 170 python3 tools/bench/stream.py --count 12000 --batch 192 --rounds 5 2>&1 | tail -40 | tee "$OUT/stream.log"
fi
if [[ $PARTS == *" imagenet "* ]]; then
  echo "== stream --imagenet"
  timeout 150 python3 tools/bench/stream.py --imagenet --quick 2>&1 | tail -30 | tee "$OUT/imagenet_stream.log"
fi
if [[ $PARTS == *" predict "* ]]; then
  echo "== predict"
  timeout 150 python3 tools/bench/predict.py --model resnet50 --count 2400 --batch 128 --workers 8 --rounds 2 2>&1 \
    | tail -12 | tee "$OUT/predict.log"
fi
if [[ $PARTS == *" feed "* ]]; then
  echo "== feed: end-to-end img/s, 4 against 16 loader workers, decoding in the loader and on the GPU"
  timeout 120 python3 - /tmp/feed <<'PY'
import sys; sys.path.insert(0, "tools/bench")
from pathlib import Path
from common import photo_jpegs
from distssl.shards import ImageOptions, make_shards
root = Path(sys.argv[1]); photo_jpegs(root / "raw", 3000, classes=100)
make_shards(str(root / "raw"), str(root / "shards"), labels_per_class=10, eval_fraction=0.02, min_shards=16,
            image=ImageOptions(max_size=320, format="jpg"), progress=False)
PY
  for decode in loader device; do
    for workers in 4 16; do
      timeout 110 python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --config configs/imagenet.yaml \
        run.out_dir=/tmp/feed/run-$decode-$workers data.labeled=/tmp/feed/shards/labeled \
        data.unlabeled=/tmp/feed/shards/unlabeled data.eval=/tmp/feed/shards/eval model.num_classes=100 \
        train.batch_size=32 train.steps=30 train.eval_every=0 train.ckpt_every=0 run.log_every=10 \
        train.num_workers=$workers data.decode_on=$decode data.shuffle_buffer=500 run.loggers=[] \
        > "$OUT/feed-$decode-$workers.log" 2>&1
      echo "decode_on=$decode workers=$workers exit $?: $(grep '"train"' /tmp/feed/run-$decode-$workers/metrics.jsonl \
        2>/dev/null | tail -1 | python3 -c 'import json,sys; d=json.loads(sys.stdin.read() or "{}"); print("img_s", d.get("img_s"))')" \
        | tee -a "$OUT/feed.log"
    done
  done
fi
[[ $PARTS == *" demo "* ]] || exit 0
echo "== demo on the GPU"
start=$(date +%s)
timeout 170 python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --config configs/demo.yaml \
  run.out_dir=/tmp/gpu-demo train.num_workers=6 > "$OUT/demo.log" 2>&1
echo "demo exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/demo.log"
tail -15 "$OUT/demo.log"
cp /tmp/gpu-demo/summary.json "$OUT/demo_summary.json" 2>/dev/null && cat "$OUT/demo_summary.json"
cp /tmp/gpu-demo/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
true
echo "== demo, random-resized crops at 64 px, views made on the GPU"
start=$(date +%s)
timeout 170 python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --config configs/demo.yaml \
  run.out_dir=/tmp/gpu-demo-device train.num_workers=6 data.image_size=64 data.crop=random_resized \
  "data.crop_scale=[0.5,1.0]" data.eval_crop_pct=0.875 data.augment_on=device > "$OUT/demo_device.log" 2>&1
echo "demo (device views) exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/demo_device.log"
cp /tmp/gpu-demo-device/summary.json "$OUT/demo_device_summary.json" 2>/dev/null && cat "$OUT/demo_device_summary.json"
true
