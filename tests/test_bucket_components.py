"""ssl.open_set (IOMatch) and ssl.imbalance (ABC, ACR) on a pseudo-label rule, against the authors' code written out
here line by line (IOMatch: nukezil/IOMatch semilearn/algorithms/iomatch/iomatch.py ``train_step`` and its
utils' ``mb_sup_loss``; ABC: USB semilearn 0.3.2 imb_algorithms/abc/abc.py ``compute_abc_loss``; ACR:
Gank0078/ACR train.py ``train``), on the same logits, labels and state; and the parts around them: the estimated
DA target (Saerens et al.'s EM), the heads in one forward, the balanced head as the export's classifier."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from distssl.distributed.collectives import sum_over_ranks
from distssl.models.heads import add_heads, export_state
from distssl.ssl import component
from distssl.ssl.distalign import DistributionAlignment
from distssl.ssl.fixmatch import FixMatch
from distssl.ssl.imbalance import ABCConfig, ACRConfig
from distssl.ssl.open_set import IOMatchConfig
from distssl.ssl.step import Forwarded

K, NL, NU = 5, 6, 12


def logits(n, k, seed, scale=3.0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def labels(seed):
    return torch.randint(0, K, (NL,), generator=torch.Generator().manual_seed(seed))


def forwarded(head: str, width: int, step: int = 50, seed: int = 0) -> Forwarded:
    return Forwarded(logits_x=logits(NL, K, seed), targets_x=labels(seed + 1),
                     logits_u={"weak": logits(NU, K, seed + 2), "strong": logits(NU, K, seed + 3)},
                     heads_x={head: logits(NL, width, seed + 4)},
                     heads_u={head: {"weak": logits(NU, width, seed + 5), "strong": logits(NU, width, seed + 6)}},
                     ids=torch.arange(NU), step=step, total_steps=100, seed=7)


# -- IOMatch: the authors' code --
def iomatch_mb_sup_loss(logits_ova, label):  # IOMatch utils.mb_sup_loss (OpenMatch's)
    batch_size = logits_ova.size(0)
    logits_ova = logits_ova.view(batch_size, 2, -1)
    num_classes = logits_ova.size(2)
    probs_ova = F.softmax(logits_ova, 1)
    label_s_sp = torch.zeros((batch_size, num_classes)).long()
    label_range = torch.arange(0, batch_size).long()
    label_s_sp[label_range[label < num_classes], label[label < num_classes]] = 1
    label_sp_neg = 1 - label_s_sp
    open_loss = torch.mean(torch.sum(-torch.log(probs_ova[:, 1, :] + 1e-8) * label_s_sp, 1))
    open_loss_neg = torch.mean(torch.max(-torch.log(probs_ova[:, 0, :] + 1e-8) * label_sp_neg, 1)[0])
    return open_loss_neg + open_loss


def iomatch_train_step(fw, p_cutoff, q_cutoff, lambda_mb, lambda_op):
    """IOMatch's train_step from its logits on (dist_align off). The closed-set term with the rule's hard
    pseudo-label (our departure, docs/algorithms.md: the authors' soft CE on 0.95-confident probabilities)."""
    num_ulb = fw.logits_u["weak"].shape[0]
    logits_mb_x_lb = fw.heads_x["open_set"][:, :2 * K]
    logits_mb_x_ulb_w = fw.heads_u["open_set"]["weak"][:, :2 * K]
    logits_open_x_ulb_s = fw.heads_u["open_set"]["strong"][:, 2 * K:]
    sup_closed_loss = F.cross_entropy(fw.logits_x, fw.targets_x)
    sup_mb_loss = lambda_mb * iomatch_mb_sup_loss(logits_mb_x_lb, fw.targets_x)
    p = F.softmax(fw.logits_u["weak"], dim=-1)
    targets_p = p.detach()
    r = F.softmax(logits_mb_x_ulb_w.view(num_ulb, 2, -1), 1)
    tmp_range = torch.arange(0, num_ulb).long()
    out_scores = torch.sum(targets_p * r[tmp_range, 0, :], 1)
    in_mask = (out_scores < 0.5)
    o_neg, o_pos = r[tmp_range, 0, :], r[tmp_range, 1, :]
    q = torch.zeros((num_ulb, K + 1))
    q[:, :K] = targets_p * o_pos
    q[:, K] = torch.sum(targets_p * o_neg, 1)
    p_mask = (targets_p.max(dim=1).values >= p_cutoff).float()
    q_mask = (q.max(dim=1).values >= q_cutoff).float()
    ui = (F.cross_entropy(fw.logits_u["strong"], targets_p.argmax(1), reduction="none") * in_mask * p_mask).mean()
    op = ((-(q * F.log_softmax(logits_open_x_ulb_s, dim=-1)).sum(1)) * q_mask).mean()
    return sup_closed_loss + sup_mb_loss + ui + lambda_op * op, in_mask


def test_iomatch_on_fixmatch_is_the_authors_train_step():
    cfg = IOMatchConfig(lambda_ova=0.7, lambda_open=1.3)
    for seed in range(3):
        fw = forwarded("open_set", 3 * K + 1, seed=seed * 10)
        iom = component.IOMatch(K, cfg, threshold=0.6, total_steps=100, reduce=sum_over_ranks)
        rule = FixMatch(K, tau=0.6, lambda_u=1.0, components=[iom])
        loss, stats = rule.loss(fw)
        expected, in_mask = iomatch_train_step(fw, 0.6, cfg.q_cutoff, cfg.lambda_ova, cfg.lambda_open)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert float(stats["outlier_share"]) == pytest.approx(1 - in_mask.float().mean().item())
    assert rule.needs.heads == ("open_set",) and "open_set" in rule.heads and rule.eval_head is None


def openmatch_ova_ent(logits_open):  # OpenMatch utils.ova_ent
    logits_open = logits_open.view(logits_open.size(0), 2, -1)
    logits_open = F.softmax(logits_open, 1)
    return torch.mean(torch.mean(torch.sum(-logits_open * torch.log(logits_open + 1e-8), 1), 1))


def openmatch_socr(logits_open_u1, logits_open_u2):  # OpenMatch train.py's L_socr
    n = logits_open_u1.size(0)
    logits_open_u1 = F.softmax(logits_open_u1.view(n, 2, -1), 1)
    logits_open_u2 = F.softmax(logits_open_u2.view(n, 2, -1), 1)
    return torch.mean(torch.sum(torch.sum(torch.abs(logits_open_u1 - logits_open_u2) ** 2, 1), 1))


def test_iomatch_options_add_openmatchs_terms_and_pseudo_inliers_to_the_authors_step():
    """lambda_em / lambda_socr: OpenMatch's ova_ent on the strong view and L_socr between the weak and strong
    view; pseudo_inliers: IOMatch's (OpenMatch's) one-vs-all loss on the confident inliers of the unlabeled batch,
    their pseudo-labels as the class, averaged over the whole batch (as the rule's loss is)."""
    base_cfg = IOMatchConfig()
    cfg = IOMatchConfig(lambda_em=0.1, lambda_socr=0.5, pseudo_inliers=2.0)
    fw = forwarded("open_set", 3 * K + 1, seed=3)
    loss = {}
    for name, c in (("base", base_cfg), ("more", cfg)):
        iom = component.IOMatch(K, c, threshold=0.6, total_steps=100, reduce=sum_over_ranks)
        loss[name], _ = FixMatch(K, tau=0.6, lambda_u=1.0, components=[iom]).loss(fw)
    ova_w = fw.heads_u["open_set"]["weak"][:, :2 * K]
    ova_s = fw.heads_u["open_set"]["strong"][:, :2 * K]
    p = F.softmax(fw.logits_u["weak"], dim=-1)
    r = F.softmax(ova_w.view(NU, 2, -1), 1)
    keep = (p.max(1).values >= 0.6) & ((p * r[:, 0, :]).sum(1) < 0.5)
    assert 0 < int(keep.sum()) < NU
    pseudo_term = iomatch_mb_sup_loss(ova_s[keep], p.argmax(1)[keep]) * keep.float().mean()
    expected = 0.1 * openmatch_ova_ent(ova_s) + 0.5 * openmatch_socr(ova_w, ova_s) + 2.0 * pseudo_term
    assert float(loss["more"] - loss["base"]) == pytest.approx(float(expected), rel=1e-5)


def test_iomatch_has_no_open_set_loss_in_its_first_epoch():
    cfg = IOMatchConfig()
    fw = forwarded("open_set", 3 * K + 1, step=0)
    iom = component.IOMatch(K, cfg, threshold=0.6, total_steps=1000, reduce=sum_over_ranks)
    _, stats = FixMatch(K, tau=0.6, lambda_u=1.0, components=[iom]).loss(fw)
    assert float(stats["loss_open"]) == 0.0
    fw.step = 10  # past 1/256 of 1,000 steps
    _, stats = FixMatch(K, tau=0.6, lambda_u=1.0, components=[iom]).loss(fw)
    assert float(stats["loss_open"]) > 0.0


# -- ABC: USB's compute_abc_loss --
def usb_compute_abc_loss(lb_class_dist, abc_p_cutoff, epoch, epochs, logits_x_lb, y_lb, logits_x_ulb_w,
                         logits_x_ulb_s, bernouli_mask):
    mask_lb = bernouli_mask(lb_class_dist[y_lb])
    abc_lb_loss = (F.cross_entropy(logits_x_lb, y_lb, reduction="none") * mask_lb).mean()
    with torch.no_grad():
        probs_x_ulb_w = torch.softmax(logits_x_ulb_w, dim=-1)
        max_probs, y_ulb = torch.max(probs_x_ulb_w, dim=1)
        mask_ulb_1 = max_probs.ge(abc_p_cutoff).to(logits_x_ulb_w.dtype)
        ulb_class_dist = 1 - (epoch / epochs) * (1 - lb_class_dist)
        mask_ulb_2 = bernouli_mask(ulb_class_dist[y_ulb])
        mask_ulb = mask_ulb_1 * mask_ulb_2
    abc_ulb_loss = (F.cross_entropy(logits_x_ulb_s, y_ulb, reduction="none") * mask_ulb).mean()
    return abc_lb_loss + abc_ulb_loss


def test_abc_is_usbs_compute_abc_loss_with_the_same_draws():
    hist = [40, 20, 10, 5, 2]
    fw = forwarded("balanced", K, step=30)
    abc = component.ABC(K, ABCConfig(p_cutoff=0.6, weight=0.5), threshold=0.95, total_steps=100,
                        reduce=sum_over_ranks, label_histogram=hist)
    rule = FixMatch(K, tau=0.95, lambda_u=1.0, components=[abc])
    loss, _ = rule.loss(fw)
    base, _ = FixMatch(K, tau=0.95, lambda_u=1.0).loss(fw)
    # the draws ours made for this step (a generator of seed, step and the first id), in the same order
    g = torch.Generator().manual_seed((fw.seed * 1_000_003 + fw.step) * 2_654_435_761 + 0)
    draws = [torch.rand(NL, generator=g), torch.rand(NU, generator=g)]
    bernoulli = lambda p: (draws.pop(0) < p).float()  # noqa: E731 - torch.bernoulli(p) given its uniforms
    lb_class_dist = torch.tensor(min(hist) / torch.tensor(hist, dtype=torch.float64).numpy())
    expected = usb_compute_abc_loss(lb_class_dist.float(), 0.6, 30, 100, fw.heads_x["balanced"], fw.targets_x,
                                    fw.heads_u["balanced"]["weak"], fw.heads_u["balanced"]["strong"], bernoulli)
    assert float(loss - base) == pytest.approx(0.5 * float(expected), rel=1e-5)
    assert rule.eval_head == "balanced"


# -- ACR: the authors' train.py --
def compute_adjustment_by_py(py, tro):
    return torch.log(py ** tro + 1e-12)


def acr_step(fw, py_con, tau, tau12, tau2, threshold):
    logits_x, logits_u_w, logits_u_s = fw.logits_x, fw.logits_u["weak"], fw.logits_u["strong"]
    logits_x_b = fw.heads_x["balanced"]
    logits_u_w_b, logits_u_s_b = fw.heads_u["balanced"]["weak"], fw.heads_u["balanced"]["strong"]
    adjustment_l1 = compute_adjustment_by_py(py_con, tau)
    adjustment_l12 = compute_adjustment_by_py(py_con, tau12)
    adjustment_l2 = compute_adjustment_by_py(py_con, tau2)
    Lx = F.cross_entropy(logits_x, fw.targets_x, reduction="mean")
    Lx_b = F.cross_entropy(logits_x_b + adjustment_l2, fw.targets_x, reduction="mean")
    pseudo_label = torch.softmax(logits_u_w.detach() - adjustment_l1, dim=-1)
    pseudo_label_h2 = torch.softmax(logits_u_w.detach() - adjustment_l12, dim=-1)
    pseudo_label_b = torch.softmax(logits_u_w_b.detach(), dim=-1)
    pseudo_label_t = torch.softmax(logits_u_w.detach(), dim=-1)
    max_probs, targets_u = torch.max(pseudo_label, dim=-1)
    max_probs_h2, targets_u_h2 = torch.max(pseudo_label_h2, dim=-1)
    max_probs_b, targets_u_b = torch.max(pseudo_label_b, dim=-1)
    max_probs_t, _ = torch.max(pseudo_label_t, dim=-1)
    mask, mask_h2 = max_probs.ge(threshold), max_probs_h2.ge(threshold)
    mask_b, mask_t = max_probs_b.ge(threshold), max_probs_t.ge(threshold)
    mask_ss_b_h2 = (mask_b + mask_h2).float()
    mask_ss_t = (mask + mask_t).float()
    # one strong view (ours) where the authors forward two (their logits_u_s1): the same term, once
    Lu = (F.cross_entropy(logits_u_s, targets_u, reduction="none") * mask_ss_t).mean()
    Lu_b = (F.cross_entropy(logits_u_s_b, targets_u_h2, reduction="none") * mask_ss_b_h2).mean()
    return Lx + Lu + Lx_b + Lu_b, targets_u_b, mask_b


def test_acr_step_is_the_authors_and_tau_adapts_as_theirs():
    hist = [40, 20, 10, 5, 2]
    py_con = torch.tensor(hist, dtype=torch.float32) / sum(hist)
    cfg = ACRConfig(tau1=2.0, tau12=1.5, tau2=1.0, ema_u=0.9, estimate_from=0.0, update_every=0.02)
    acr = component.ACR(K, cfg, threshold=0.7, total_steps=100, reduce=lambda t: t, label_histogram=hist)
    rule = FixMatch(K, tau=0.7, lambda_u=1.0, components=[acr])
    u_py = torch.ones(K) / K
    count_kl, tau = torch.zeros(3), cfg.tau1
    kl_div = torch.nn.KLDivLoss(reduction="sum")
    py_uni, py_rev = torch.ones(K) / K, torch.flip(py_con, dims=[0])
    for step in range(6):
        fw = forwarded("balanced", K, step=step, seed=step * 7)
        loss, _ = rule.loss(fw)
        expected, targets_u_b, mask_b = acr_step(fw, py_con, tau, cfg.tau12, cfg.tau2, 0.7)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5), f"step {step}"
        rule.end_step()
        # the authors' estimate, counting every confident prediction (theirs: now_mask[targets] += mask, which
        # PyTorch writes once per repeated index; ours counts: docs/algorithms.md)
        now_mask = torch.bincount(targets_u_b[mask_b], minlength=K).float()
        if now_mask.sum() > 0:
            now_mask = now_mask / now_mask.sum()
            u_py = 0.9 * u_py + 0.1 * now_mask
            for i, ref in enumerate((py_con, py_uni, py_rev)):
                count_kl[i] += 0.5 * kl_div(ref.log(), u_py) + 0.5 * kl_div(u_py.log(), ref)
        if (step + 1) % 2 == 0:  # update_every 0.02 of 100 steps: their epoch of 2 steps
            c = count_kl / 2
            tau = cfg.tau1 * (torch.exp(c[0]) / torch.exp(c).sum()).item()
            count_kl = torch.zeros(3)
        assert acr.tau == pytest.approx(tau, rel=1e-5)
        assert torch.allclose(acr.estimate, u_py, atol=1e-6)
    assert acr.tau != cfg.tau1  # it adapted


def test_acr_state_round_trips_and_a_run_without_it_is_refused():
    hist = [40, 20, 10, 5, 2]
    acr = component.ACR(K, ACRConfig(), threshold=0.7, total_steps=100, reduce=lambda t: t, label_histogram=hist)
    acr.tau, acr.estimate = 0.7, torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    rule = FixMatch(K, tau=0.7, lambda_u=1.0, components=[acr])
    again = FixMatch(K, tau=0.7, lambda_u=1.0, components=[
        component.ACR(K, ACRConfig(), threshold=0.7, total_steps=100, reduce=lambda t: t, label_histogram=hist)])
    again.load_state_dict(rule.state_dict())
    assert again.components[0].tau == 0.7 and torch.equal(again.components[0].estimate, acr.estimate)
    with pytest.raises(ValueError, match="made without acr"):
        again.load_state_dict(FixMatch(K, tau=0.7, lambda_u=1.0).state_dict())
    with pytest.raises(ValueError, match="class histogram"):
        component.ACR(K, ACRConfig(), threshold=0.7, total_steps=100, reduce=lambda t: t, label_histogram=None)


def test_a_component_on_a_consistency_method_is_refused():
    from distssl.ssl.pimodel import PiModel

    iom = component.IOMatch(K, IOMatchConfig(), threshold=0.6, total_steps=100, reduce=sum_over_ranks)
    with pytest.raises(ValueError, match="pseudo-label rule"):
        PiModel(K, tau=0.95, lambda_u=1.0, components=[iom])


def test_estimated_target_is_saerens_em_on_the_global_batch():
    """p_target moves, with DA's momentum, towards one EM step of Saerens et al. (2002): posteriors reweighted
    by p_target / train_prior, renormalised, averaged."""
    train_prior = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05])
    da = DistributionAlignment(K, momentum=0.5, train_prior=train_prior, reduce=lambda t: t)
    assert torch.allclose(da.p_target, train_prior)
    probs = torch.softmax(logits(32, K, 3), dim=1)
    da.update(probs)
    w = probs * (train_prior / train_prior)  # the first step: p_target is the train prior
    em = (w / w.sum(1, keepdim=True)).mean(0)
    assert torch.allclose(da.p_target, 0.5 * train_prior + 0.5 * em, atol=1e-6)
    before = da.p_target.clone()
    da.update(probs)
    w = probs * (before / train_prior)
    em = (w / w.sum(1, keepdim=True)).mean(0)
    assert torch.allclose(da.p_target, 0.5 * before + 0.5 * em, atol=1e-6)
    assert math.isclose(float(da.p_target.sum()), 1.0, rel_tol=1e-5)


def test_heads_come_from_the_same_backbone_pass_and_the_balanced_head_exports_as_the_classifier():
    model = timm.create_model("test_resnet", num_classes=K)
    heads = {**component.head_specs("iomatch", "acr", K, projection=16)}
    add_heads(model, heads)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    out, extra = model(x, heads=tuple(heads))
    assert torch.allclose(out, model(x), atol=1e-6)
    assert torch.allclose(extra["balanced"], model(x, head="balanced"), atol=1e-6)
    assert extra["open_set"].shape == (3, 3 * K + 1)
    state = export_state(model.state_dict(), model, heads, "balanced", keep=("open_set",))
    plain = timm.create_model("test_resnet", num_classes=K)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not missing and unexpected and all(k.startswith("open_set_head.") for k in unexpected)
    plain.eval()
    assert torch.allclose(plain(x), extra["balanced"], atol=1e-5)  # the export classifies as the balanced head


def test_an_export_with_an_outlier_head_scores_every_image_and_leaves_unknowns_out_of_pseudo_labels(
        tiny_data, tmp_path):
    """The export carries IOMatch's head under its prefix (one file, one fingerprint); distssl-predict writes
    outlier_score = sum_k p_k p_out(k) of the calibrated p (computed here by hand from the head) and unknown at
    0.5, and confident rows it names unknown do not become pseudo-labels, nor candidates for --select."""
    import pyarrow.parquet as pq

    from distssl.models.export import model_meta, write_export
    from distssl.predict.model import load_predictor
    from distssl.predict.parts import make_parts
    from distssl.predict.pseudo import confident_rows
    from distssl.predict.rank_parts import predict_parts, read_part
    from distssl.predict.select import candidates

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    heads = component.head_specs("iomatch", "none", 10, projection=8)
    add_heads(model, heads)
    model.eval()
    from distssl.data.streams import tar_samples
    from distssl.data.transforms import Views

    views = Views(28)
    samples = list(tar_samples(resolve_url(tiny_data["unlabeled"])))
    x = torch.stack([views.eval(views.eval_image(raw.fields["png"])) for raw in samples]).float() / 255
    with torch.no_grad():  # a head whose outlier score is sigmoid(-2 z0): unknown for the images with z0 <= median
        head = model.open_set_head
        z0 = head.projection(model.forward_head(model.forward_features((x - 0.5) / 0.25), pre_logits=True))[:, 0]
        head.projection[2].bias[0] -= z0.median()
        head.one_vs_all.weight.zero_()
        head.one_vs_all.weight[:10, 0], head.one_vs_all.weight[10:, 0] = -5.0, 5.0
    state = export_state(model.state_dict(), model, heads, keep=(component.OUTLIER_HEAD,))
    meta = model_meta("test_resnet", 10, 28, [0.5] * 3, [0.25] * 3, [str(i) for i in range(10)],
                      {**component.outlier_meta(8)}, run="tests/iom", step=3, temperature=2.0)
    write_export(state, meta, tmp_path / "model")
    predictor = load_predictor(str(tmp_path / "model"), torch.device("cpu"))
    assert predictor.outlier_head is not None
    parts = make_parts(tiny_data["unlabeled"])
    out = tmp_path / "pred"
    predict_parts(predictor, parts, str(out), 0, 1, 64, 3, torch.device("cpu"), progress=False)
    rows = [r for f in sorted((out / "parts").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    unknown = [r for r in rows if r["unknown"]]
    assert 0 < len(unknown) < len(rows)
    assert all(r["unknown"] == (r["outlier_score"] >= 0.5) for r in rows)
    # one image by hand: the classifier and the head on the same pooled features, T = 2
    raw = samples[0]
    x = (predictor.views.eval(predictor.views.eval_image(raw.fields["png"]))[None].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        p = (model.get_classifier()(pooled) / 2.0).softmax(1)
        r = F.softmax(model.open_set_head(pooled)[:, :20].view(1, 2, 10), dim=1)
        want = float((p * r[:, 0, :]).sum())
    mine = next(r for r in rows if r["key"] == raw.key)
    assert mine["outlier_score"] == pytest.approx(want, rel=1e-4)
    chosen = {k for part in parts for k in confident_rows(str(out), part, 0.0)[0]}
    assert chosen == {(r["key"], r["source"]) for r in rows if not r["unknown"]}
    assert {c.key for c in candidates(str(out), parts)} <= {r["key"] for r in rows if not r["unknown"]}
    assert read_part(str(out), parts[0], ["key", "unknown"])[0].keys() == {"key", "unknown"}


def resolve_url(spec: str) -> str:
    from distssl.data.index import resolve

    return resolve(spec).urls[0]


@pytest.mark.slow
def test_a_run_with_both_components_resumes_exports_its_heads_and_predicts_outliers(tiny_data, tmp_path):
    """1 process: train with ssl.open_set=iomatch and ssl.imbalance=acr, resume to more steps; the run's export
    and distssl-export's of its last checkpoint are the same weights (the balanced head as the classifier, the
    outlier head kept), and distssl-predict scores every image."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import ROOT, run_train, tiny_overrides
    from support.servers import launch_env

    run = tmp_path / "run"
    keys = {"ssl.open_set": "iomatch", "ssl.imbalance": "acr", "train.eval_every": 2, "train.ckpt_every": 2}
    r = run_train(tiny_overrides(tiny_data, run, **{"train.steps": 2, **keys}))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(tiny_overrides(tiny_data, run, **{"train.steps": 4, **keys}))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and 0 <= summary["balanced_top1"] <= 1
    assert summary["derived"]["ssl.dist_align"].startswith("false")
    meta = json.loads((run / "model.json").read_text())
    assert meta["outlier_head"]["prefix"] == "open_set_head." and meta["outlier_head"]["score"] == "prototypes"
    ours = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("open_set_head.") for k in ours) and not any(k.startswith("balanced_head.") for k in ours)
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, str(ROOT / "tools/export_model.py"), str(run), str(out), "--no-calibrate"],
                       capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(out / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "model.json").read_text())["outlier_head"] == meta["outlier_head"]
    pred = tmp_path / "pred"
    r = subprocess.run([sys.executable, str(ROOT / "launch/predict.py"), str(run), "--data", tiny_data["eval"],
                        "--out", str(pred)], capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "named unknown" in r.stdout
    import pyarrow.parquet as pq

    rows = [row for f in sorted((pred / "parts").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]
    assert len(rows) == 97 and all(0 <= row["outlier_score"] <= 2 for row in rows)  # 1 - a cosine
    assert json.loads((pred / "summary.json").read_text())["unknown"] == sum(row["unknown"] for row in rows)


def _pooled_by_hand(model, views, raw_png: bytes) -> torch.Tensor:
    x = (views.eval(views.eval_image(raw_png))[None].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)[0]


def test_an_export_scores_outliers_by_distance_to_the_labelled_class_prototypes(tiny_data, tmp_path):
    """An export with an outlier head carries each class's prototype, the normalised mean of its labelled images'
    normalised pooled features (computed here by hand from the exported weights), and unknown_at, the score 5% of
    the eval images (all inside the label set) reach; distssl-predict's outlier_score is 1 - the image's largest
    cosine to a prototype, and unknown whether it reaches unknown_at."""
    import pyarrow.parquet as pq

    from distssl.data.streams import tar_samples
    from distssl.data.transforms import Views
    from distssl.models.export import model_meta, write_export
    from distssl.predict.model import load_predictor
    from distssl.predict.parts import make_parts
    from distssl.predict.prototypes import PROTOTYPES_KEY, add_prototypes
    from distssl.predict.rank_parts import predict_parts

    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=10)
    heads = component.head_specs("iomatch", "none", 10, projection=8)
    add_heads(model, heads)
    model.eval()
    state = export_state(model.state_dict(), model, heads, keep=(component.OUTLIER_HEAD,))
    meta = model_meta("test_resnet", 10, 28, [0.5] * 3, [0.25] * 3, [str(i) for i in range(10)],
                      {**component.outlier_meta(8)}, run="tests/proto", step=3)
    state, meta = add_prototypes(state, meta, tiny_data["labeled"], tiny_data["eval"], torch.device("cpu"))
    spec = meta["outlier_head"]
    assert spec["score"] == "prototypes" and spec["prototype_images"] == 20 and spec["calibrated_on_images"] == 97
    views = Views(28)
    by_class: dict[int, list[torch.Tensor]] = {}
    for s in (s for url in _urls(tiny_data["labeled"]) for s in tar_samples(url)):
        f = _pooled_by_hand(model, views, s.fields["png"])
        by_class.setdefault(int(s.fields["cls"]), []).append(f / f.norm())
    want = torch.stack([torch.stack(by_class[c]).mean(0) for c in range(10)])
    want = want / want.norm(dim=1, keepdim=True)
    assert torch.allclose(state[PROTOTYPES_KEY], want, atol=1e-5)
    write_export(state, meta, tmp_path / "model")
    predictor = load_predictor(str(tmp_path / "model"), torch.device("cpu"))
    out = tmp_path / "pred"
    predict_parts(predictor, make_parts(tiny_data["eval"]), str(out), 0, 1, 64, 3, torch.device("cpu"),
                  progress=False)
    rows = {r["key"]: r for f in sorted((out / "parts").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    at = spec["unknown_at"]
    assert all(r["unknown"] == (r["outlier_score"] >= at) for r in rows.values())
    assert 1 <= sum(r["unknown"] for r in rows.values()) <= 6  # 5% of the 97 eval images (ties aside)
    for s in list(tar_samples(_urls(tiny_data["eval"])[0]))[:5]:
        f = _pooled_by_hand(model, views, s.fields["png"])
        cos = max(float(f @ want[c]) / float(f.norm()) for c in range(10))
        assert rows[s.key]["outlier_score"] == pytest.approx(1 - cos, abs=1e-5)


def _urls(spec: str) -> list[str]:
    from distssl.data.index import resolve

    return list(resolve(spec).urls)
