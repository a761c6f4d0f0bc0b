"""The model a prediction runs: an export of this project (``model.safetensors`` + ``model.json``), found
from a run folder or given as the file, built with timm and fed the eval transform the run evaluated
with (its size, centre-crop fraction, interpolation, mean and std, all in ``model.json``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import distssl.models.wrn  # noqa: F401 (registers the WideResNets with timm)
from distssl.data.transforms import Views
from distssl.errors import DamagedFile, UserError
from distssl.models import identity
from distssl.models.export import META_NAME, WEIGHTS_NAME
from distssl.ssl.open_set import OUTLIER_AT, OpenSetHead


@dataclass
class Predictor:
    model: torch.nn.Module
    meta: dict
    views: Views
    mean: torch.Tensor
    std: torch.Tensor
    temperature: float  # softmax(logits / T): 1 unless the run fitted one (model.json "temperature")
    # IOMatch's head on the pooled features (model.json "outlier_head"): each image's outlier score
    outlier_head: Optional[torch.nn.Module] = None
    # the labelled classes' prototypes (model.json "outlier_head" "prototypes"): the score, where present
    prototypes: Optional[torch.Tensor] = None

    @property
    def unknown_at(self) -> float:
        return float(self.meta.get("outlier_head", {}).get("unknown_at", OUTLIER_AT))

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])


def find_export(path: str) -> Path:
    """``model.safetensors`` of a run folder (or the file itself)."""
    p = Path(path)
    weights = p / WEIGHTS_NAME if p.is_dir() else p
    if not weights.exists():
        raise UserError(f"{path}: no {WEIGHTS_NAME} there. Give a finished run's folder (training exports its EMA "
                          f"weights at the end) or an exported model file; export a checkpoint with "
                          f"`distssl-export RUN_DIR OUT`")
    if not weights.with_suffix(".json").exists():
        raise UserError(f"{weights}: no {META_NAME} beside it (its input size, mean/std and classes); export it "
                          f"again with `distssl-export RUN_DIR OUT`")
    return weights


def load_predictor(path: str, device: torch.device) -> Predictor:
    """The export at ``path``, its weights and model.json checked to be one export (distssl.models.identity)
    before anything is read with them."""
    from safetensors.torch import load_file

    weights = find_export(path)
    meta_path = weights.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise DamagedFile(f"{meta_path} is not JSON (cut short?): export the model again with distssl-export") from None
    identity.check(str(weights), meta, str(meta_path))
    return predictor_from(load_file(str(weights)), meta, device, str(weights))


def predictor_from(state: dict[str, torch.Tensor], meta: dict, device: torch.device, where: str = "the weights"
                   ) -> Predictor:
    """A Predictor of weights in memory and their model.json (an export being written, or one just read)."""
    import timm

    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=int(meta["num_classes"]))
    outlier_head, prototypes = None, None
    if "outlier_head" in meta:  # IOMatch's head, under its prefix in the same file (one fingerprint for both)
        spec = meta["outlier_head"]
        prefix = spec["prefix"]
        outlier_head = OpenSetHead(model.num_features, int(meta["num_classes"]), int(spec["projection"]))
        head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        try:
            outlier_head.load_state_dict(head_state)
        except RuntimeError as e:
            raise UserError(f"{where}: the outlier head model.json names does not fit its weights "
                            f"({str(e).splitlines()[0][:160]}): export the run again") from None
        outlier_head.eval().to(device)
        if spec.get("prototypes"):
            prototypes = state.pop(spec["prototypes"], None)
            if prototypes is None or tuple(prototypes.shape) != (int(meta["num_classes"]), model.num_features):
                raise UserError(f"{where}: the class prototypes model.json names are missing or of another shape "
                                f"than ({meta['num_classes']}, {model.num_features}): export the run again")
            prototypes = prototypes.float().cpu()  # the scores are computed beside the logits, on the CPU
    own = model.state_dict()
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shapes:
        k = shapes[0]
        raise UserError(f"{where} do not fit {meta['architecture']} with {meta['num_classes']} classes ({k}: "
                        f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model; {len(shapes)} "
                        f"tensors differ): give the weights beside the model.json they were exported with")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where} do not fit {meta['architecture']}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    model.eval().to(device)
    size = int(meta["input_size"][-1])
    views = Views(size, interpolation=meta.get("interpolation", "bilinear"), eval_crop_pct=meta.get("crop_pct", 1.0))
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    return Predictor(model, meta, views, as_tensor(meta["mean"]), as_tensor(meta["std"]),
                     float(meta.get("temperature", 1.0)), outlier_head, prototypes)
