#!/usr/bin/env python
"""Export a run's EMA weights from any of its checkpoints as model.safetensors + model.json.

  python tools/export_model.py RUN_DIR OUT            # latest complete checkpoint of RUN_DIR
  python tools/export_model.py RUN_DIR/checkpoints/step_00000500 OUT.safetensors

OUT is a folder (gets model.safetensors) or a .safetensors path; the JSON lands beside it. Works
for every ZeRO stage (ZeRO-3's per-rank slices are reassembled) and needs no GPU or process group.
Load the result with timm (no hub access):

  meta = json.load(open("OUT/model.json"))
  model = timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"],
                            pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file="OUT/model.safetensors"))
"""
import argparse
import sys

from distssl.cli import skip_the_final_collections


def main(argv=None) -> int:
    skip_the_final_collections()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder, its checkpoints/ folder, or one checkpoints/step_N folder")
    p.add_argument("out", help="output folder or .safetensors path")
    args = p.parse_args(argv)

    from distssl.data.index import resolve
    from distssl.errors import UserError
    from distssl.models.export import ema_weights_from_run, model_meta, write_export

    try:
        state, info = ema_weights_from_run(args.run)
    except (FileNotFoundError, UserError) as e:
        print(f"export_model: {e}", file=sys.stderr)
        return 2
    cfg = info["config"]
    d = cfg["data"]
    class_names: list[str] = []
    for key in ("eval", "labeled"):
        try:
            class_names = resolve(d[key]).class_names
        except Exception:  # noqa: BLE001 - class names are a nicety; the shards may have moved
            class_names = []
        if class_names:
            break
    meta = model_meta(cfg["model"]["name"], cfg["model"]["num_classes"], d["image_size"], d["mean"], d["std"],
                      class_names, {"step": info["step"], "weights": "ema", "checkpoint": info["checkpoint"]},
                      # runs saved before these keys existed evaluated a full-image bilinear crop
                      crop_pct=d.get("eval_crop_pct") or 1.0, interpolation=d.get("interpolation") or "bilinear")
    out = write_export(state, meta, args.out)
    n = sum(t.numel() for t in state.values())
    print(f"exported {len(state)} tensors ({n:,} values) of {cfg['model']['name']} at step {info['step']} "
          f"to {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
