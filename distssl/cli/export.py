#!/usr/bin/env python
"""Export a run's EMA weights from any of its checkpoints as model.safetensors + model.json.

  distssl-export RUN_DIR OUT            # latest complete checkpoint of RUN_DIR
  distssl-export RUN_DIR/checkpoints/step_00000500 OUT.safetensors

OUT is a folder (gets model.safetensors) or a .safetensors path; the JSON lands beside it. Works
for every ZeRO stage (ZeRO-3's per-rank slices are reassembled) and needs no GPU or process group.
The export is calibrated: its softmax temperature is fitted (temperature scaling) on the run's eval set,
or on --calibrate-on SPEC, and written into model.json with the NLL and ECE before and after; with
--no-calibrate, or when no labeled set can be read, the JSON says it has none. Both files carry the same
fingerprint (architecture, classes, run, step, temperature), which distssl-predict checks.
Load the result with timm (no hub access):

  meta = json.load(open("OUT/model.json"))
  model = timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"],
                            pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file="OUT/model.safetensors"))
"""
import argparse
import sys

from distssl.calibration import calibrate
from distssl.cli import command
from distssl.data.index import resolve
from distssl.errors import UserError
from distssl.models.export import ema_weights_from_run, model_meta, write_export
from distssl.predict.model import predictor_from
from distssl.predict.parts import make_parts
from distssl.predict.prototypes import add_prototypes
from distssl.predict.rank_parts import labeled_logits
from distssl.storage.store import redact


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder, its checkpoints/ folder, or one checkpoints/step_N folder")
    p.add_argument("out", help="output folder or .safetensors path")
    p.add_argument("--calibrate-on", metavar="SPEC", help="the labeled set the temperature is fitted on (default: "
                   "the run's data.eval)")
    p.add_argument("--no-calibrate", action="store_true", help="no temperature (the model's raw softmax)")
    args = p.parse_args(argv)

    try:
        state, info = ema_weights_from_run(args.run)
    except (FileNotFoundError, UserError) as e:
        print(f"distssl-export: {e}", file=sys.stderr)
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
    def meta_with(temperature=None, calibration=None):
        return model_meta(cfg["model"]["name"], cfg["model"]["num_classes"], d["image_size"], d["mean"], d["std"],
                          class_names, {"weights": "ema", "checkpoint": info["checkpoint"], **info["meta"],
                           **(calibration or {})},
                          # runs saved before these keys existed evaluated a full-image bilinear crop
                          crop_pct=d.get("eval_crop_pct") or 1.0, interpolation=d.get("interpolation") or "bilinear",
                          run=redact(info["run_dir"]), step=info["step"], temperature=temperature)

    meta, said = meta_with(), "no temperature (--no-calibrate)"
    spec = args.calibrate_on or d.get("eval")
    if not args.no_calibrate and spec:
        try:
            temperature, calibration = fit_temperature_of(state, meta, spec)
            meta = meta_with(temperature, calibration)
            ece = f"ECE {calibration['eval_ece_before']:.3f} -> {calibration['eval_ece_after']:.3f}"
            said = f"temperature {temperature:.4g} fitted on {redact(str(spec))} ({ece})"
        except (FileNotFoundError, UserError, ValueError) as e:
            if args.calibrate_on:
                print(f"distssl-export: --calibrate-on {args.calibrate_on}: {e}", file=sys.stderr)
                return 2
            said = f"no temperature: the run's eval set could not be read ({str(e).splitlines()[0][:160]})"
    elif not args.no_calibrate:
        said = "no temperature: the run names no eval set (--calibrate-on SPEC fits one)"
    if "outlier_head" in meta:  # the outlier score's class prototypes, as the run's own export has them
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        state, meta = add_prototypes(state, meta, d.get("labeled"), d.get("eval"), device)
    out = write_export(state, meta, args.out)
    n = sum(t.numel() for t in state.values())
    print(f"exported {len(state)} tensors ({n:,} values) of {cfg['model']['name']} at step {info['step']} "
          f"to {out} and {out.with_suffix('.json')}; {said}")
    return 0


def fit_temperature_of(state: dict, meta: dict, spec) -> tuple[float, dict]:
    """The temperature of the weights ``state`` (with ``meta``'s eval transform) on the labeled set ``spec``."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor = predictor_from(state, meta, device)
    logits, labels = labeled_logits(predictor, make_parts(spec), 256, device)
    report = calibrate(logits, labels)
    return report["temperature"], {"temperature_fitted_on": f"{redact(str(spec))}, by distssl-export",
                                   **{f"eval_{k}": report[k] for k in ("nll_before", "nll_after", "ece_before",
                                                                       "ece_after")}}


if __name__ == "__main__":
    sys.exit(main())
