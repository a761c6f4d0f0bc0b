"""Sample builders: one raw tar sample (image bytes, ``cls``, ``json``) in, the tensors of one
training or eval item out, or None for a bad sample (counted by the stream, never fatal). The
streams (distssl/data/streams.py) call them; which builder a stream gets says what it feeds:
labeled (weak view + label), unlabeled (both views from one decode, or the device-view plan), eval.
"""
from __future__ import annotations

import json
import random
from typing import Callable, Optional

import torch

from distssl.data.ctaugment import CTAViews
from distssl.data.device_augment import strong_plan, weak_plan
from distssl.data.device_decode import encoded_base
from distssl.data.index import IMAGE_KEYS, SampleIds
from distssl.data.streams import Raw
from distssl.data.targets import dense
from distssl.data.transforms import Views, to_uint8
from distssl.data.views import is_strong, view_order


def _image_bytes(raw: Raw) -> Optional[bytes]:
    return next((raw.fields[k] for k in IMAGE_KEYS if k in raw.fields), None)


def _label(raw: Raw) -> Optional[int]:
    if "cls" in raw.fields:
        try:
            return int(raw.fields["cls"].decode().strip())
        except ValueError:
            return None
    return None


LabelMaps = Optional[dict[int, list[int]]]  # per source of a stream: its labels in the labeled set's order


def _meta_label(raw: Raw, label_maps: LabelMaps = None) -> int:
    try:
        label = int(json.loads(raw.fields["json"]).get("label", -1)) if "json" in raw.fields else -1
    except (ValueError, AttributeError):
        return -1
    return _mapped(label, raw, label_maps)


def _mapped(label: Optional[int], raw: Raw, label_maps: LabelMaps) -> Optional[int]:
    """A set's label in the labeled set's class order (data.class_match=by_name)."""
    label_map = label_maps.get(raw.source) if label_maps else None
    if label_map is None or label is None or not 0 <= label < len(label_map):
        return label
    return label_map[label]


def _decode_or_none(raw: Raw, decode_bytes: Callable[[bytes], "object"]):
    data = _image_bytes(raw)
    if data is None:
        return None
    try:
        return decode_bytes(data)
    except Exception:  # undecodable image: counted by the caller, never fatal
        return None


def soft_target(raw: Raw, label: int, num_classes: int, label_maps: LabelMaps = None) -> torch.Tensor:
    """The sample's target distribution: its json's ``soft`` (``ids`` and ``probs``: a teacher's top classes,
    the rest of the mass spread evenly over the other classes), else the one-hot ``label``."""
    try:
        soft = json.loads(raw.fields["json"]).get("soft") if "json" in raw.fields else None
        ids = [_mapped(int(i), raw, label_maps) for i in soft["ids"]]
        probs = [float(p) for p in soft["probs"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        soft = None
    if soft is None or not ids or len(ids) != len(probs) or not all(0 <= i < num_classes for i in ids):
        return torch.nn.functional.one_hot(torch.tensor(label), num_classes).float()
    return torch.from_numpy(dense(ids, probs, num_classes)).float()


def labeled_item(views: Views, label_maps: LabelMaps = None, strong: bool = False,
                 probe: Optional[CTAViews] = None, soft_classes: int = 0) -> Callable:
    """The weak view and the label (``strong``: the strong view, a self-training student's input noise);
    with ``probe`` (data.strong_aug=ctaugment) also CTAugment's probe of the weak view (``x_probe``) and
    the ops and levels that made it (``probe_choices``), drawn after the view's own choices; with
    ``soft_classes`` (data.labeled_targets=soft: the class count) the target distribution ``y_soft``."""
    view = views.strong if strong else views.weak

    def make(raw: Raw, rng: random.Random) -> Optional[dict]:
        label = _mapped(_label(raw), raw, label_maps)
        img = _decode_or_none(raw, lambda data: views.base(data, rng)) if label is not None else None
        if img is None:
            return None
        item = {"x": view(img, rng), "y": label}
        if soft_classes:
            item["y_soft"] = soft_target(raw, label, soft_classes, label_maps)
        if probe is not None:
            weak = item["x"] if not strong else views.weak(img, rng)
            item["x_probe"], item["probe_choices"] = probe.probe(weak, rng)
        return item
    return make


def sample_id(raw: Raw, ids: Optional[SampleIds]) -> int:
    """A stable id per unlabeled sample (per-sample algorithm state: FlexMatch): see data.index.SampleIds."""
    return (ids or SampleIds([], [])).of(raw.key, raw.source, raw.shard, raw.index)


def _in_draw_order(wanted: tuple[str, ...]) -> list[str]:
    """The views in the order their random choices are drawn from the sample's rng, whichever an
    algorithm asks for: weak, strong, then a second weak view (Pi-Model, Mean Teacher)."""
    return sorted(set(wanted), key=view_order)  # raises on a name the loader cannot make


def unlabeled_item(views: Views, label_maps: LabelMaps = None, ids: Optional[SampleIds] = None,
                   wanted: tuple[str, ...] = ("weak", "strong"), cta: Optional[CTAViews] = None) -> Callable:
    """The ``wanted`` views come from one decode (and, with data.crop=random_resized, one crop) of the
    image; the strong ones by RandAugment, or by CTAugment's policy with ``cta``."""
    order = _in_draw_order(wanted)
    strong = cta.strong if cta is not None else views.strong

    def make(raw: Raw, rng: random.Random) -> Optional[dict]:
        img = _decode_or_none(raw, lambda data: views.base(data, rng))
        if img is None:
            return None
        item = {v: strong(img, rng) if is_strong(v) else views.weak(img, rng) for v in order}
        return {**item, "y_true": _meta_label(raw, label_maps), "idx": sample_id(raw, ids)}
    return make


def unlabeled_plan_item(views: Views, label_maps: LabelMaps = None, ids: Optional[SampleIds] = None,
                        wanted: tuple[str, ...] = ("weak", "strong"), cta: Optional[CTAViews] = None) -> Callable:
    """``data.augment_on=device``: the decoded (and cropped) base image and the random choices of the
    ``wanted`` views, drawn from the sample's rng in the loader path's order; the views are made on the
    device (distssl.data.device_augment)."""

    order = _in_draw_order(wanted)
    strong = (lambda v, rng: cta.strong_plan(rng)) if cta is not None else strong_plan

    def make(raw: Raw, rng: random.Random) -> Optional[dict]:
        img = _decode_or_none(raw, lambda data: views.base(data, rng))
        if img is None:
            return None
        plans = {f"plan_{v}": torch.tensor(strong(views, rng) if is_strong(v) else weak_plan(views, rng))
                 for v in order}
        return {"base": to_uint8(img), **plans, "y_true": _meta_label(raw, label_maps),
                "idx": sample_id(raw, ids)}
    return make


def labeled_encoded_item(views: Views, label_maps: LabelMaps = None, strong: bool = False) -> Callable:
    """``data.decode_on=device``: the labeled sample undecoded (a JPEG's bytes and crop box) and the
    random choices of its view, drawn in the loader path's order; the trainer decodes it and makes the view."""
    plan = strong_plan if strong else weak_plan

    def make(raw: Raw, rng: random.Random) -> Optional[dict]:
        label = _mapped(_label(raw), raw, label_maps)
        base = _decode_or_none(raw, lambda data: encoded_base(views, data, rng)) if label is not None else None
        return None if base is None else {**base, "plan_x": torch.tensor(plan(views, rng)), "y": label}
    return make


def unlabeled_encoded_item(views: Views, label_maps: LabelMaps = None, ids: Optional[SampleIds] = None,
                           wanted: tuple[str, ...] = ("weak", "strong")) -> Callable:
    """``data.decode_on=device``: as ``unlabeled_plan_item``, with the JPEG's bytes and crop box in place
    of the decoded base."""
    order = _in_draw_order(wanted)

    def make(raw: Raw, rng: random.Random) -> Optional[dict]:
        base = _decode_or_none(raw, lambda data: encoded_base(views, data, rng))
        if base is None:
            return None
        plans = {f"plan_{v}": torch.tensor(strong_plan(views, rng) if is_strong(v) else weak_plan(views, rng))
                 for v in order}
        return {**base, **plans, "y_true": _meta_label(raw, label_maps), "idx": sample_id(raw, ids)}
    return make


def eval_item(views: Views, label_maps: LabelMaps = None) -> Callable:
    def make(raw: Raw, rng) -> Optional[dict]:
        label = _mapped(_label(raw), raw, label_maps)
        img = _decode_or_none(raw, views.eval_image) if label is not None else None
        return None if img is None else {"x": views.eval(img), "y": label}
    return make
