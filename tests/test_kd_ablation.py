"""The dense teacher config and the distillation ablation benchmark (benchmarks/bench_kd_ablation.py):
the teacher is street-tiny scaled up at the same grid, classes and input; the benchmark's headline
arithmetic (gap closed, spread over seeds, targets) gives hand-computed values; a tiny end-to-end run
writes the report."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from occdistill.engine.config import load_train_config
from occdistill.models.build import build_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_kd_ablation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kd_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's namespace
    spec.loader.exec_module(module)
    return module


def test_teacher_config_builds_at_the_students_grid_classes_and_input():
    teacher_cfg, student_cfg = load_train_config("street-teacher"), load_train_config("street-tiny")
    teacher, student = build_model(teacher_cfg.model), build_model(student_cfg.model)
    assert teacher.grid == student.grid and teacher.grid.shape == (100, 100, 16)
    assert teacher.cfg.num_classes == student.cfg.num_classes == 18
    assert teacher.cfg.image_size == student.cfg.image_size == (128, 224)
    assert teacher_cfg.data == student_cfg.data  # both read the same loader
    assert teacher_cfg.loss == student_cfg.loss and teacher_cfg.optim == student_cfg.optim
    # scaled up: deeper and wider backbone, finer depth bins, more BEV channels, more parameters
    t, s = teacher.cfg, student.cfg
    assert t.backbone.depth > s.backbone.depth and t.backbone.base_width > s.backbone.base_width
    assert teacher.view_transform.depth_bins.num_bins == 2 * student.view_transform.depth_bins.num_bins == 56
    assert t.bev_channels == 2 * s.bev_channels and t.context_channels > s.context_channels
    params = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
    assert params[0] > 2.5 * params[1]


def test_gap_closed_by_hand(bench):
    assert bench.gap_closed(20.0, 10.0, 15.0) == pytest.approx(0.5)
    assert bench.gap_closed(20.0, 10.0, 22.0) == pytest.approx(1.2)
    assert bench.gap_closed(20.0, 10.0, 8.0) == pytest.approx(-0.2)
    assert bench.gap_closed(10.0, 10.0, 12.0) is None  # no gap to close
    assert bench.gap_closed(9.0, 10.0, 12.0) is None


def test_spread_over_seeds_by_hand(bench):
    s = bench.spread([10.0, 12.0, 14.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(12.0) and s["std"] == pytest.approx(2.0)  # sample std
    assert (s["min"], s["max"], s["values"]) == (10.0, 14.0, [10.0, 12.0, 14.0])
    assert bench.spread([7.0]) == {"n": 1, "mean": 7.0, "std": 0.0, "min": 7.0, "max": 7.0, "values": [7.0]}
    assert bench.spread([1.0, None])["mean"] is None


def test_summary_per_seed_mean_and_targets_by_hand(bench):
    per_seed = {0: {"no_kd": 10.0, "both": 14.0, "mfd": 11.0}, 1: {"no_kd": 12.0, "both": 15.0, "mfd": 0.0}}
    out = bench.summarize(20.0, per_seed)
    assert out["distilled_variant"] == "both"
    assert out["per_seed"]["0"] == {"teacher_mIoU": 20.0, "student_mIoU": 10.0, "distilled_mIoU": 14.0,
                                    "gap_closed": pytest.approx(0.4)}
    assert out["per_seed"]["1"]["gap_closed"] == pytest.approx(3.0 / 8.0)
    gap = out["mean"]["gap_closed"]
    assert gap["mean"] == pytest.approx((0.4 + 0.375) / 2)
    assert gap["std"] == pytest.approx(math.sqrt(2) * 0.0125)  # |0.4 - 0.375| / sqrt(2)
    assert out["mean"]["student_mIoU"]["mean"] == pytest.approx(11.0)
    assert out["mean"]["distilled_mIoU"]["mean"] == pytest.approx(14.5)
    assert out["gap_closed_of_means"] == pytest.approx(3.5 / 9.0)
    targets = out["targets"]
    assert targets["teacher_clearly_above_student"]["margin_points"] == pytest.approx(8.0)  # 20 - max(10, 12)
    assert targets["teacher_clearly_above_student"]["met"] and not targets["gap_closed"]["met"]
    # a teacher within 2 points of one seed's student is not "clearly above"
    assert not bench.summarize(13.5, per_seed)["targets"]["teacher_clearly_above_student"]["met"]
    assert bench.summarize(30.0, {0: {"no_kd": 10.0, "both": 20.0}})["targets"]["gap_closed"]["met"]


def test_latency_summary_and_variant_overrides(bench):
    lat = bench.latency_summary(300.0, 75.0)
    assert lat["ratio"] == pytest.approx(4.0) and not lat["met"]
    assert bench.latency_summary(800.0, 75.0)["met"]
    assert bench.variant_overrides("no_kd", "d") == []
    both = bench.variant_overrides("both_fp16", "d")
    assert "distill.dump=d" in both and "distill.dump_source=fp16" in both
    assert "distill.dense.lambda_feat=1.0" in both and "distill.dense.lambda_logit=1.0" in both
    assert "distill.dense.lambda_logit=0.0" in bench.variant_overrides("mfd", "d")
    assert "distill.dense.lambda_feat=0.0" in bench.variant_overrides("cwd", "d")
    for v in bench.VARIANTS:  # every variant is a valid student config
        load_train_config("street-tiny", bench.variant_overrides(v, "d", teacher_run="t"))
    img = load_train_config("street-tiny", bench.variant_overrides("both_feat10_img", "d", teacher_run="t")).distill
    assert img.image_teacher == "t" and img.dense.lambda_img == bench.LAMBDA_IMG and img.dense.lambda_feat == 10.0
    assert not load_train_config("street-tiny", bench.variant_overrides("both", "d", teacher_run="t")).distill.image_teacher
    with pytest.raises(ValueError, match="give the teacher run"):
        bench.variant_overrides("both_feat10_img", "d")


def test_each_sweep_variant_is_both_with_its_declared_change(bench):
    """A sweep variant's student config differs from ``both``'s in exactly the fields its change names
    (the later override replaces the recipe's value), and the report names that change."""
    both = load_train_config("street-tiny", bench.variant_overrides("both", "d")).distill.dense
    expected = {
        "hinton_kd": {"lambda_feat": 0.0, "lambda_logit": 0.0, "lambda_kd": 1.0, "tau_kd": 2.0},
        "both_tau4": {"tau_cwd": 4.0}, "both_logit3": {"lambda_logit": 3.0}, "both_feat3": {"lambda_feat": 3.0},
        "both_feat10": {"lambda_feat": 10.0}, "both_feat30": {"lambda_feat": 30.0},
        "both_feat10_okd": {"lambda_feat": 10.0, "lambda_kd": 1.0, "tau_kd": 2.0, "kd_voxels": "occupied"},
        "both_feat10_nofree": {"lambda_feat": 10.0, "cwd_skip_free": True},
        "both_feat10_img": {"lambda_feat": 10.0, "lambda_img": 1.0},
        "both_dil0": {"mfd_dilation": 0}, "both_dil3": {"mfd_dilation": 3}, "both_mse": {"mfd_normalize": False},
    }
    assert set(bench.SWEEP_VARIANTS) == set(expected)
    for v, change in expected.items():
        cfg = load_train_config("street-tiny", bench.variant_overrides(v, "d", teacher_run="t")).distill.dense
        differs = {k: getattr(cfg, k) for k in vars(both) if getattr(cfg, k) != getattr(both, k)}
        assert differs == change, v
    kd = bench.SWEEP_KD["both_logit3"]
    text = bench._change_text({"lambda_feat": kd.lambda_feat, "lambda_logit": kd.lambda_logit,
                               "changes": ["distill.dense.tau_cwd=4.0"]}, bench.LAMBDA_FEAT)
    assert text == "lambda_logit=3.0, tau_cwd=4.0"


@pytest.mark.parametrize("teacher", ["street-teacher", "street-gaussian-teacher"])
def test_every_teacher_setup_gives_valid_configs(bench, teacher):
    """Each teacher's tiny smoke overrides load with its config, and every student variant reads the
    teacher's MFD target (a Gaussian teacher dumps no BEV feature: MFD matches its BEV probabilities)."""
    setup = bench.TEACHERS[teacher]
    assert load_train_config(teacher, list(setup.smoke)).model.kind in ("dense", "gaussian")
    assert setup.bev_feature == (setup.mfd_target == "feature")
    for v in bench.VARIANTS:
        cfg = load_train_config("street-tiny", bench.variant_overrides(v, "d", setup.mfd_target, teacher_run="t"))
        assert v == "no_kd" or cfg.distill.dense.mfd_target == setup.mfd_target


def test_selected_variants(bench):
    def error(message):
        raise ValueError(message)

    assert bench.selected_variants(None, False, error) == (bench.VARIANTS, ())
    assert bench.selected_variants(None, True, error) == (bench.VARIANTS, bench.SWEEP_VARIANTS)
    # declaration order, whatever the order given; ablation and sweep names split apart
    assert bench.selected_variants("both_feat3, both,no_kd", False, error) == (("no_kd", "both"), ("both_feat3",))
    with pytest.raises(ValueError, match="unknown both_tau9"):
        bench.selected_variants("no_kd,both,both_tau9", False, error)
    with pytest.raises(ValueError, match="must include no_kd"):
        bench.selected_variants("both,mfd", False, error)
    # --lambda-feat 10: both_feat10 IS the headline, so the sweep leaves it out and refuses it by name
    ablation, swept = bench.selected_variants(None, True, error, lambda_feat=10.0)
    assert ablation == bench.VARIANTS and "both_feat10" not in swept and "both_feat3" in swept
    with pytest.raises(ValueError, match="both_feat10 is both at --lambda-feat 10.0"):
        bench.selected_variants("no_kd,both,both_feat10", False, error, lambda_feat=10.0)


def test_lambda_feat_sets_the_headline_mfd_weight(bench):
    """--lambda-feat moves the MFD weight of mfd/both/both_fp16 only; the sweep keeps its own weights
    and its change is reported against the headline's."""
    weights = {v: load_train_config("street-tiny", bench.variant_overrides(v, "d", "bev_prob", 10.0)).distill.dense
               for v in ("mfd", "cwd", "both", "both_fp16", "both_feat3")}
    assert [weights[v].lambda_feat for v in weights] == [10.0, 0.0, 10.0, 10.0, 3.0]
    assert [weights[v].lambda_logit for v in weights] == [0.0, 1.0, 1.0, 1.0, 1.0]
    kd = bench.variant_kd("both_feat3", 10.0)
    distill = {"lambda_feat": kd.lambda_feat, "lambda_logit": kd.lambda_logit, "changes": []}
    assert bench._change_text(distill, 10.0) == "lambda_feat=3.0" and bench._change_text(distill, 3.0) == ""


@pytest.mark.parametrize("override", ["distill.dense.tau_cwd=2", "runtime.seed=3", "optim.max_steps=5", "loss"])
def test_student_set_refuses_what_the_benchmark_sets(bench, override, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--smoke", "--student-set", override])
    assert exit_info.value.code == 2 and "--student-set" in capsys.readouterr().err


def test_smoke_run_writes_the_report(tmp_path, bench):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--seeds", "0", "--work", str(work), "--sweep",
                           "--student-set", "loss.lovasz_weight=0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "kd_ablation.json").read_text())
    assert report["smoke"] and report["seeds"] == [0] and report["lambda_feat"] == bench.LAMBDA_FEAT
    assert set(report["variants"]) == {"no_kd", "mfd", "cwd", "both", "both_fp16"}
    assert report["distilled_mIoU"] == report["variants"]["both"]["per_seed"]["0"]["mIoU"]
    assert report["student_mIoU"] == report["variants"]["no_kd"]["per_seed"]["0"]["mIoU"]
    terms = {v: set(report["variants"][v]["per_seed"]["0"]["final_train_terms"]) for v in report["variants"]}
    assert {"mfd", "cwd"} <= terms["both"] and {"mfd", "cwd"} <= terms["both_fp16"]
    assert "img" not in terms["both"] and "img" not in terms["mfd"]
    assert "mfd" in terms["mfd"] and "cwd" not in terms["mfd"] and "cwd" in terms["cwd"] and "mfd" not in terms["cwd"]
    assert not {"mfd", "cwd"} & terms["no_kd"]
    # --student-set reaches every student, no_kd included, and is recorded
    assert all("lovasz" in t for t in terms.values()) and report["student_overrides"] == ["loss.lovasz_weight=0.5"]
    assert report["latency"]["teacher"]["image_size"] == report["latency"]["student"]["image_size"]
    assert report["latency_ratio"] > 0 and (work / "dump" / "manifest_train.json").is_file()
    md = (work / "kd_ablation.md").read_text()
    assert "| student both |" in md and "`street-tiny` with `loss.lovasz_weight=0.5`" in md
    # --sweep: its variants reported beside the ablation (not in it), each trained with its change
    assert set(report["sweep"]) == set(bench.SWEEP_VARIANTS) and "| both_tau4 | tau_cwd=4.0 |" in md
    assert report["sweep"]["hinton_kd"]["distill"]["changes"] == ["distill.dense.lambda_kd=1.0",
                                                                 "distill.dense.tau_kd=2.0"]
    assert "kd" in report["sweep"]["hinton_kd"]["per_seed"]["0"]["final_train_terms"]
    assert {"mfd", "cwd", "img"} <= set(report["sweep"]["both_feat10_img"]["per_seed"]["0"]["final_train_terms"])
