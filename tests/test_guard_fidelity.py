"""Issue 14, fidelity with the community's code: P@X arithmetic, combined split names, degenerate polygons.

The references are transcribed from the community's code: LAVT's `evaluate` loop (test.py, which
VPD copies) for the metrics, and lichengunc/refer's `getRefIds` and `getMask` for splits and masks.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as coco_mask

from refseg.core.metrics import RefSegMetrics, format_table
from refseg.core.refer import DegeneratePolygonWarning, ReferDataset, in_split

from _data_util import DATASET, SQUARE_A, SQUARE_B, expected_masks, instances, refs, write_tiny_dataset


# ---- P@X, oIoU, mIoU: LAVT's arithmetic ---------------------------------------------------------------
def lavt_evaluate(pairs):
    """LAVT's test.py `evaluate`, operation for operation, on (I, U) pairs -> (numbers, printed lines)."""
    cum_I, cum_U = 0, 0
    eval_seg_iou_list = [.5, .6, .7, .8, .9]
    seg_correct = np.zeros(len(eval_seg_iou_list), dtype=np.int32)
    seg_total = 0
    mean_IoU = []
    for I, U in pairs:
        I, U = np.int64(I), np.int64(U)  # np.sum of a boolean mask
        this_iou = 0.0 if U == 0 else I * 1.0 / U
        mean_IoU.append(this_iou)
        cum_I += I
        cum_U += U
        for n_eval_iou in range(len(eval_seg_iou_list)):
            seg_correct[n_eval_iou] += (this_iou >= eval_seg_iou_list[n_eval_iou])
        seg_total += 1
    mIoU = np.mean(np.array(mean_IoU))
    numbers = {f"P@{t}": seg_correct[k] * 100. / seg_total for k, t in enumerate(eval_seg_iou_list)}
    numbers["oIoU"] = cum_I * 100. / cum_U
    numbers["mIoU"] = mIoU * 100.
    printed = {key: '%.2f' % value for key, value in numbers.items()}
    return numbers, printed


def test_p_at_x_23_of_160_is_14_38_as_lavt_prints_it():
    m = RefSegMetrics()
    for k in range(160):
        m.add(1 if k < 23 else 0, 1)
    s = m.summary()
    assert s["P@0.5"] == 14.375 and s["P@0.5"] == 23 * 100. / 160
    assert '%.2f' % s["P@0.5"] == "14.38"
    assert format_table([("T=0", s)]).splitlines()[2].split(" | ")[1] == "14.38"


def test_p_at_x_is_hits_times_100_over_total_for_every_small_pair():
    """Every (hits, total) with total <= 300: exactly the float `hits * 100. / total`."""
    old_arithmetic_differs = 0
    for n in range(1, 301):
        # IoUs 1/n .. n/n; threshold (c - 0.5)/n keeps the n - c + 1 IoUs >= c/n, c = 1 .. n + 1 (0 hits)
        m = RefSegMetrics(thresholds=[(c - 0.5) / n for c in range(1, n + 2)])
        for i in range(1, n + 1):
            m.add(i, n)
        s = m.summary()
        for c, t in zip(range(1, n + 2), m.thresholds):
            hits = n - c + 1
            value = s[f"P@{t:g}"]
            assert type(value) is float and value == hits * 100. / n, (hits, n, value)
            old_arithmetic_differs += float(100.0 * np.mean(np.arange(n) < hits)) != value
    assert old_arithmetic_differs > 10_000  # a quarter of the 45,450 pairs: the test would catch the old way


@pytest.mark.parametrize("seed", range(5))
def test_summary_equals_lavt_evaluate_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    unions = rng.integers(0, 5000, n)
    unions[rng.random(n) < 0.05] = 0  # empty prediction and empty GT: IoU 0, as LAVT counts it
    inter = (unions * rng.random(n) ** 0.3).astype(np.int64)
    inter[rng.random(n) < 0.2] = 0  # some misses
    inter = np.minimum(inter, unions)
    hit = rng.random(n) < 0.2
    inter[hit] = unions[hit]  # some exact hits (IoU 1.0)
    pairs = list(zip(inter.tolist(), unions.tolist()))
    numbers, printed = lavt_evaluate(pairs)
    ours = RefSegMetrics()
    for i, u in pairs:
        ours.add(i, u)
    s = ours.summary()
    for key, value in numbers.items():
        assert s[key] == float(value), key
    row = format_table([("x", s)]).splitlines()[2].strip("| ").split(" | ")[1:]
    assert row == [printed[k] for k in ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")]
    # accumulating in two processes and merging gives the same bits
    a, b = RefSegMetrics(), RefSegMetrics()
    for k, (i, u) in enumerate(pairs):
        (a if k % 2 else b).add(i, u)
    merged = a.merge(b).summary()
    assert {k: merged[k] for k in ("P@0.5", "P@0.9", "oIoU", "n")} == {k: s[k] for k in ("P@0.5", "P@0.9", "oIoU", "n")}


# ---- split names: refer.getRefIds ------------------------------------------------------------------------
SPLITS = ["train", "val", "testA", "testB", "testC", "testAB", "testBC", "testAC", "testA", "val"]


def refer_get_ref_ids(all_refs, split):
    """lichengunc/refer `REFER.getRefIds(split=...)`, its split branch as written (sys.exit -> None)."""
    refs = all_refs
    if split in ['testA', 'testB', 'testC']:
        refs = [ref for ref in refs if split[-1] in ref['split']]
    elif split in ['testAB', 'testBC', 'testAC']:
        refs = [ref for ref in refs if ref['split'] == split]
    elif split == 'test':
        refs = [ref for ref in refs if 'test' in ref['split']]
    elif split == 'train' or split == 'val':
        refs = [ref for ref in refs if ref['split'] == split]
    else:
        return None
    return [ref['ref_id'] for ref in refs]


def _refs_with_splits(splits):
    out = []
    for k, split in enumerate(splits):
        sents = [{"sent_id": 100 + 2 * k + j, "sent": f"thing {k} {j}", "raw": f"Thing {k} {j}.", "tokens": []}
                 for j in range(2)]
        out.append({"ref_id": k, "ann_id": 101 + k % 2, "image_id": 1, "category_id": 1, "split": split,
                    "sent_ids": [s["sent_id"] for s in sents], "sentences": sents, "file_name": "x.jpg"})
    return out


@pytest.mark.parametrize("split", ["train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC"])
def test_split_selection_matches_refer_get_ref_ids(tmp_path, split):
    data = _refs_with_splits(SPLITS)
    ds = ReferDataset(write_tiny_dataset(tmp_path, refs_data=data), DATASET)
    expected = refer_get_ref_ids(data, split)
    assert [r["ref_id"] for r in ds.refs(split)] == expected
    # one sample per sentence of those refs, in file order
    assert [s.sent_id for s in ds.samples(split)] == [100 + 2 * k + j for k in expected for j in range(2)]


def test_combined_split_names_by_hand(tmp_path):
    ds = ReferDataset(write_tiny_dataset(tmp_path, refs_data=_refs_with_splits(SPLITS)), DATASET)

    def ids(split):
        return [r["ref_id"] for r in ds.refs(split)]

    assert ids("testA") == [2, 5, 7, 8]  # testA, testAB, testAC, testA
    assert ids("testB") == [3, 5, 6]  # testB, testAB, testBC
    assert ids("testC") == [4, 6, 7]  # testC, testBC, testAC
    assert ids("testAB") == [5] and ids("testBC") == [6] and ids("testAC") == [7]
    assert ids("test") == [2, 3, 4, 5, 6, 7, 8] and ids("val") == [1, 9] and ids("train") == [0]
    assert in_split("testA", "testAB") and in_split("testB", "testAB") and not in_split("testC", "testAB")
    assert not in_split("testAB", "testA") and not in_split("train", "training")


def test_letter_splits_are_offered_when_only_combined_names_exist(tmp_path):
    ds = ReferDataset(write_tiny_dataset(tmp_path, refs_data=_refs_with_splits(["train", "val", "testAB"])), DATASET)
    assert ds.available_splits() == ["train", "val", "test", "testA", "testB", "testAB"]
    assert [r["ref_id"] for r in ds.refs("testA")] == [2] == [r["ref_id"] for r in ds.refs("testB")]
    with pytest.raises(Exception, match=r"unknown split 'testC'.*available: train, val, test, testA, testB, testAB"):
        ds.refs("testC")


# ---- degenerate polygons: refer.getMask ------------------------------------------------------------------
def refer_get_mask(segmentation, h, w) -> np.ndarray:
    """lichengunc/refer `REFER.getMask` for a polygon annotation, then LAVT's `annot[m == 1] = 1`."""
    rle = coco_mask.frPyObjects(segmentation, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 2 and pycocotools' decode
        m = coco_mask.decode(rle)
    m = np.sum(m, axis=2).astype(np.uint8)
    return m == 1


def _dataset_with(tmp_path, ann_id: int, segmentation, **kwargs):
    data = instances()
    next(a for a in data["annotations"] if a["id"] == ann_id)["segmentation"] = segmentation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ReferDataset(write_tiny_dataset(tmp_path, instances_data=data, **kwargs), DATASET)
    return ds, [w for w in caught if issubclass(w.category, DegeneratePolygonWarning)]


def _all_masks(ds):
    return {(r["ref_id"], rule): ds.mask(r["ref_id"], rule) for r in refs() for rule in ("vpd", "union")}


# 1 point, 2 points (the 4 numbers pycocotools takes for a box when first), empty, odd lengths below 3 points
DEGENERATE = {"1 point": [3, 3], "2 points": [3, 3, 12, 12], "empty": [], "1 number": [3],
              "3 numbers": [3, 3, 12], "5 numbers": [3, 3, 12, 12, 4], "2 points as floats": [2.5, 3.5, 11.25, 8.0]}


@pytest.mark.parametrize("kind", list(DEGENERATE))
def test_extra_degenerate_polygon_is_skipped_as_refer_get_mask_does(tmp_path, kind):
    extra = DEGENERATE[kind]
    ds, caught = _dataset_with(tmp_path, 101, [SQUARE_A, SQUARE_B, extra])
    # where refer.getMask is defined (the degenerate polygon not first), the same mask, byte for byte
    np.testing.assert_array_equal(ds.mask(0), refer_get_mask([SQUARE_A, SQUARE_B, extra], 20, 30))
    np.testing.assert_array_equal(ds.mask(0), expected_masks()["vpd"])
    np.testing.assert_array_equal(ds.mask(0, "union"), expected_masks()["union"])
    # every other annotation's mask is unchanged
    clean = ReferDataset(write_tiny_dataset(tmp_path / "clean"), DATASET)
    theirs, ours = _all_masks(clean), _all_masks(ds)
    assert all(np.array_equal(theirs[k], ours[k]) and theirs[k].tobytes() == ours[k].tobytes() for k in theirs)
    # counted once, said once
    assert (ds.polygons.skipped, ds.polygons.trimmed, ds.polygons.annotations, ds.polygons.empty) == (1, 0, [101], [])
    assert len(caught) == 1 and str(caught[0].message) == ds.polygons.describe()
    assert "1 degenerate polygon skipped when rasterising" in ds.polygons.describe()
    assert "in 1 annotation (id 101)" in ds.polygons.describe()


@pytest.mark.parametrize("kind", ["1 point", "2 points", "empty", "5 numbers"])
def test_degenerate_polygon_first_is_skipped_not_read_as_a_box(tmp_path, kind):
    """refer.getMask fails here (frPyObjects reads a first 4-number polygon as a box): the others still count."""
    ds, caught = _dataset_with(tmp_path, 101, [DEGENERATE[kind], SQUARE_A, SQUARE_B])
    np.testing.assert_array_equal(ds.mask(0), expected_masks()["vpd"])
    np.testing.assert_array_equal(ds.mask(0, "union"), expected_masks()["union"])
    assert ds.polygons.skipped == 1 and len(caught) == 1


def test_odd_length_polygon_loses_its_last_number_as_pycocotools_does(tmp_path):
    odd = [1, 1, 25, 2, 20, 18, 7]  # 3 points and a dangling x
    ds, caught = _dataset_with(tmp_path, 102, [SQUARE_A, odd])
    expected = refer_get_mask([SQUARE_A, odd], 20, 30)
    assert expected.sum() > 100  # the triangle is drawn
    np.testing.assert_array_equal(ds.mask(1), expected)
    np.testing.assert_array_equal(ds.mask(1), refer_get_mask([SQUARE_A, odd[:6]], 20, 30))
    assert (ds.polygons.skipped, ds.polygons.trimmed, ds.polygons.annotations) == (0, 1, [102])
    assert "1 odd-length polygon rasterised without its last number, in 1 annotation (id 102)" in str(caught[0].message)


@pytest.mark.parametrize("segmentation", [[[3, 3, 12, 12]], [[], [5]], [], [[1, 2], [3, 4, 5, 6]]])
def test_annotation_with_no_polygon_left_has_an_empty_mask_and_keeps_its_refs(tmp_path, segmentation):
    ds, caught = _dataset_with(tmp_path, 102, segmentation)  # ann 102: ref 1, testA
    assert [s.sent_id for s in ds.samples("testA")] == [12]
    for rule in ("vpd", "union"):
        m = ds.mask(1, rule)
        assert m.shape == (20, 30) and m.dtype == bool and not m.any()
    np.testing.assert_array_equal(ds.mask(0), expected_masks()["vpd"])
    assert ds.polygons.empty == [102] and ds.polygons.skipped == sum(1 for _ in segmentation)
    msg = str(caught[0].message)
    assert len(caught) == 1 and "1 annotation left with no polygon (id 102): the masks of its refs are empty" in msg


def test_counts_over_annotations_and_shared_annotations_count_once(tmp_path):
    data = instances()
    anns = {a["id"]: a for a in data["annotations"]}
    anns[101]["segmentation"] = [SQUARE_A, [1, 1], SQUARE_B, [2, 2, 3, 3]]
    anns[102]["segmentation"] = [[5, 5]]
    ref_list = refs()
    ref_list.append({**ref_list[0], "ref_id": 9, "split": "val",
                     "sentences": [{"sent_id": 90, "sent": "again", "raw": "Again.", "tokens": []}]})  # ann 101 again
    with pytest.warns(DegeneratePolygonWarning) as caught:
        ds = ReferDataset(write_tiny_dataset(tmp_path, refs_data=ref_list, instances_data=data), DATASET)
    assert len([w for w in caught if w.category is DegeneratePolygonWarning]) == 1
    assert (ds.polygons.skipped, ds.polygons.annotations, ds.polygons.empty) == (3, [101, 102], [102])
    assert ds.polygons.describe() == (
        f"{ds.instances_path}: 3 degenerate polygons skipped when rasterising (fewer than 3 points, or a "
        "coordinate not finite or beyond ±1,000,000), in 2 annotations (ids 101, 102); 1 annotation left with "
        "no polygon (id 102): the masks of its refs are empty")
    np.testing.assert_array_equal(ds.mask(9), expected_masks()["vpd"])


def test_clean_dataset_reports_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegeneratePolygonWarning)
        ds = ReferDataset(write_tiny_dataset(tmp_path), DATASET)
    assert not ds.polygons and ds.polygons.describe() == ""


_MASK_IN_A_CHILD = """
import sys, warnings
import numpy as np
from refseg.core.refer import ReferDataset
warnings.simplefilter("ignore")
ds = ReferDataset(sys.argv[1], sys.argv[2])
print(int(ds.mask(0).sum()), int(ds.mask(0, "union").sum()), ds.polygons.skipped)
"""


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e8, -3e9, 10 ** 400])
def test_polygon_with_coordinates_pycocotools_cannot_rasterise_is_skipped(tmp_path, bad):
    """pycocotools segfaults (or takes gigabytes) on these: run in a child so a crash is a failure, not a kill."""
    data = instances()
    data["annotations"][0]["segmentation"] = [SQUARE_A, SQUARE_B, [bad, 1, 10, 1, 10, 10]]
    root = write_tiny_dataset(tmp_path, instances_data=data)
    done = subprocess.run([sys.executable, "-c", _MASK_IN_A_CHILD, str(root), DATASET], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["150", "175", "1"]  # the two squares, as without the bad polygon


def test_refseg_data_info_and_its_warning_line(tmp_path):
    """The command no longer refuses the dataset; the warning says the count once, on stderr."""
    data = instances()
    data["annotations"][0]["segmentation"] = [SQUARE_A, SQUARE_B, [3, 3, 12, 12]]
    root = write_tiny_dataset(tmp_path, instances_data=data)
    cmd = Path(sys.executable).parent / "refseg-data"
    done = subprocess.run([str(cmd), "info", "--data-root", str(root), "--dataset", DATASET],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "testA" in done.stdout and "total" in done.stdout
    assert done.stderr.count("1 degenerate polygon skipped when rasterising") == 1


def test_in_process_cli_runner_sees_no_refusal(tmp_path):
    from refseg.core.data_cli import main

    data = instances()
    data["annotations"][1]["segmentation"] = [[1, 1, 5, 5]]  # the only polygon of ann 102: 2 points
    root = write_tiny_dataset(tmp_path, instances_data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneratePolygonWarning)
        result = CliRunner().invoke(main, ["info", "--data-root", str(root), "--dataset", DATASET])
    assert result.exit_code == 0, result.output


def test_extraction_of_a_split_with_an_empty_annotation(tmp_path, tiny_backbone):
    """End to end: the dataset is extracted, not refused; that ref's GT is empty, every other GT unchanged."""
    from PIL import Image

    from refseg.cache import open_cache
    from refseg.extract.pipeline import ExtractionConfig, run_extraction

    def extract(root, out):
        images = root / DATASET / "images"
        images.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for name, (h, w) in (("img_one.jpg", (20, 30)), ("img_two.jpg", (10, 10))):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
        cfg = ExtractionConfig(data_root=str(root), dataset=DATASET, split="test", out=str(out), noise_ts=(0,),
                               image_size=64, token_length=16, shard_size=2, progress=False)
        run_extraction(cfg, backbone=tiny_backbone)
        cache = open_cache(out)
        return cache.index["sent_id"].tolist(), cache.gt(list(range(cache.n_samples)))

    clean_ids, clean_gt = extract(write_tiny_dataset(tmp_path / "clean"), tmp_path / "clean.zarr")
    data = instances()
    data["annotations"][1]["segmentation"] = [[1, 1, 5, 5], [7, 7]]  # ann 102 (ref 1, testA, sent 12): no polygon
    with pytest.warns(DegeneratePolygonWarning):
        ids, gt = extract(write_tiny_dataset(tmp_path / "degenerate", instances_data=data), tmp_path / "d.zarr")
    assert ids == clean_ids == [12, 13, 14]
    assert clean_gt[0].any() and not gt[0].any()
    assert gt[1:].tobytes() == clean_gt[1:].tobytes()
