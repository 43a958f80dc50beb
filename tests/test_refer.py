"""ReferDataset and safe_pickle on a hand-written RefCOCO-format dataset (tests/_data_util.py)."""

import io
import json
import os
import pickle
import numpy as np
import pytest

from refseg.core.errors import DataError, RefsegError, UnsafePickleError
from refseg.core.refer import ReferDataset, Sample
from refseg.core.safe_pickle import safe_load

from _data_util import DATASET, expected_masks, instances, py2_pickle, refs, write_tiny_dataset


@pytest.fixture
def root(tmp_path):
    return write_tiny_dataset(tmp_path)


def test_samples_one_per_sentence(root):
    ds = ReferDataset(root, DATASET)
    train = ds.samples("train")
    assert [s.sent_id for s in train] == [10, 11]
    s = train[0]
    assert isinstance(s, Sample)
    assert (s.ref_id, s.ann_id, s.image_id, s.sentence, s.category_id) == (0, 101, 1, "man on left", 1)
    # image name from instances.json, not the ref's COCO_train2014_..._101.jpg
    assert s.image_path == root / "images" / "mscoco" / "images" / "train2014" / "img_one.jpg"
    assert [s.sent_id for s in ds.samples("val")] == [15, 16, 17]
    with pytest.raises(AttributeError):
        s.sentence = "changed"  # frozen


def test_test_split_is_testA_union_testB(root):
    ds = ReferDataset(root, DATASET)
    assert [s.sent_id for s in ds.samples("testA")] == [12]
    assert [s.sent_id for s in ds.samples("testB")] == [13, 14]
    assert [s.sent_id for s in ds.samples("test")] == [12, 13, 14]
    assert ds.available_splits() == ["train", "val", "test", "testA", "testB"]


def test_unknown_split_lists_available(root):
    ds = ReferDataset(root, DATASET)
    with pytest.raises(DataError) as err:
        ds.samples("testC")
    msg = str(err.value)
    assert "'testC'" in msg and "train, val, test, testA, testB" in msg


def test_splits_counts(root):
    assert ReferDataset(root, DATASET).splits() == {
        "train": {"refs": 1, "sentences": 2, "images": 1},
        "val": {"refs": 1, "sentences": 3, "images": 1},
        "testA": {"refs": 1, "sentences": 1, "images": 1},
        "testB": {"refs": 1, "sentences": 2, "images": 1},
    }


def test_raw_text_field(root):
    ds = ReferDataset(root, DATASET, text_field="raw")
    assert ds.samples("train")[0].sentence == "Man on left."
    with pytest.raises(RefsegError):
        ReferDataset(root, DATASET, text_field="tokens")


def test_image_root_resolution(root, tmp_path):
    ds = ReferDataset(root, DATASET, image_root=tmp_path / "elsewhere")
    assert ds.samples("val")[0].image_path == tmp_path / "elsewhere" / "img_two.jpg"
    (root / DATASET / "images").mkdir()
    ds = ReferDataset(root, DATASET)
    assert ds.samples("val")[0].image_path == root / DATASET / "images" / "img_two.jpg"
    assert ds.image(2) == {"id": 2, "file_name": "img_two.jpg", "height": 10, "width": 10}


def test_vpd_and_union_masks_of_overlapping_polygons(root):
    ds = ReferDataset(root, DATASET)
    exp = expected_masks()
    vpd, union = ds.mask(0), ds.mask(0, rule="union")
    assert vpd.dtype == bool and vpd.shape == (20, 30)
    np.testing.assert_array_equal(vpd, exp["vpd"])
    np.testing.assert_array_equal(union, exp["union"])
    assert union.sum() == 175 and vpd.sum() == 150
    with pytest.raises(RefsegError):
        ds.mask(0, rule="intersection")


def test_polygon_outside_the_image_is_clipped(root):
    m = ReferDataset(root, DATASET).mask(1)
    assert m.shape == (20, 30) and 0 < m.sum() < 20 * 30
    assert m[19, 25] and not m[0, 0]


def test_crowd_rle_list_and_string_counts(root):
    ds = ReferDataset(root, DATASET)
    exp = expected_masks()
    for rule in ("vpd", "union"):
        np.testing.assert_array_equal(ds.mask(2, rule), exp["crowd_list"])
        np.testing.assert_array_equal(ds.mask(3, rule), exp["crowd_str"])


def test_py2_protocol2_pickle_loads(tmp_path):
    root = write_tiny_dataset(tmp_path, refs_bytes=py2_pickle(refs()))
    ds = ReferDataset(root, DATASET)
    assert [s.sentence for s in ds.samples("val")] == ["the dogs", "dog pack", "all dogs"]
    np.testing.assert_array_equal(ds.mask(0), expected_masks()["vpd"])


def test_bytes_keys_and_values_become_str():
    data = pickle.dumps([{b"ref_id": 1, "sent": b"caf\xe9", "raw": "caf\xe9".encode()}], protocol=3)
    assert safe_load(io.BytesIO(data)) == [{"ref_id": 1, "sent": "caf\xe9", "raw": "caf\xe9"}]


def test_py2_byte_strings_utf8_or_latin1():
    data = py2_pickle({"a": "caf\xc3\xa9", "b": "caf\xe9", "n": [1, 2.5, None, True, (3, "x")]})
    assert safe_load(io.BytesIO(data)) == {"a": "caf\xe9", "b": "caf\xe9", "n": [1, 2.5, None, True, (3, "x")]}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 0, "sentences": _Evil(marker)}], protocol=protocol)
    root = write_tiny_dataset(tmp_path / "data", refs_bytes=payload)
    with pytest.raises(UnsafePickleError) as err:
        ReferDataset(root, DATASET)
    msg = str(err.value)
    assert "refusing to unpickle" in msg and "refs(unc).p" in msg
    assert f"'{os.system.__module__}.system'" in msg  # 'posix.system' on Linux
    assert not marker.exists()


def test_any_global_is_refused(tmp_path):
    from collections import OrderedDict

    path = tmp_path / "x.p"
    path.write_bytes(pickle.dumps(OrderedDict(a=1), protocol=2))
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        safe_load(path)


def test_truncated_and_garbled_pickles(tmp_path):
    good = pickle.dumps(refs(), protocol=2)
    for name, payload in (("truncated", good[: len(good) // 2]), ("garbled", b"\x80\x02garbage\xff\x00"),
                          ("empty", b"")):
        root = write_tiny_dataset(tmp_path / name, refs_bytes=payload)
        with pytest.raises(DataError) as err:
            ReferDataset(root, DATASET)
        assert "malformed pickle" in str(err.value) and str(root / DATASET / "refs(unc).p") in str(err.value)
        assert not isinstance(err.value, UnsafePickleError)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="data root not found"):
        ReferDataset(tmp_path / "nowhere", DATASET)
    root = write_tiny_dataset(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found.*tinyref"):
        ReferDataset(root, "refcoco")
    with pytest.raises(DataError, match=r"refs file not found: .*refs\(google\)\.p .*refs\(unc\)\.p"):
        ReferDataset(root, DATASET, split_by="google")
    (root / DATASET / "instances.json").unlink()
    with pytest.raises(DataError, match="instances file not found: .*instances.json"):
        ReferDataset(root, DATASET)


def test_truncated_json(tmp_path):
    root = write_tiny_dataset(tmp_path)
    path = root / DATASET / "instances.json"
    path.write_text(json.dumps(instances())[:100])
    with pytest.raises(DataError) as err:
        ReferDataset(root, DATASET)
    assert str(err.value).startswith(f"malformed JSON in {path}")


def test_ref_with_missing_annotation(tmp_path):
    data = refs()
    data[2]["ann_id"] = 999
    root = write_tiny_dataset(tmp_path, refs_data=data)
    with pytest.raises(DataError) as err:
        ReferDataset(root, DATASET)
    msg = str(err.value)
    assert "ref #2 (ref_id 2)" in msg and "ann_id 999" in msg and "instances.json" in msg


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r.pop("split"), "ref #1 (ref_id 1) lacks field 'split'"),
        (lambda r: r.update(ref_id="1"), "ref #1 field 'ref_id' must be an integer"),
        (lambda r: r.update(image_id=None), "ref #1 (ref_id 1) field 'image_id' must be an integer"),
        (lambda r: r.update(sentences=[]), "field 'sentences' must be a non-empty list"),
        (lambda r: r["sentences"][0].pop("sent"), "sentence #0 (sent_id 12) has no text field 'sent'"),
        (lambda r: r.update(image_id=77), "refers to image_id 77"),
    ],
)
def test_malformed_refs(tmp_path, change, expected):
    data = refs()
    change(data[1])
    root = write_tiny_dataset(tmp_path, refs_data=data)
    with pytest.raises(DataError) as err:
        ReferDataset(root, DATASET)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_refs_not_a_list(tmp_path):
    root = write_tiny_dataset(tmp_path, refs_data={"refs": []})
    with pytest.raises(DataError, match="expected a list of refs"):
        ReferDataset(root, DATASET)


@pytest.mark.parametrize(
    "segmentation, expected",
    [
        # degenerate polygons (too few points, odd length, [] ...) are skipped, not refused: test_guard_fidelity.py
        ([[0, 0, 5, 0, 5, 5, 0, 5], [1, "2", 3, 4, 5, 6]], "polygon #1 is not a flat list of x, y numbers"),
        ([[0, 0, 5, 0, 5, 5, 0, 5], [[1, 2], [3, 4], [5, 6]]], "polygon #1 is not a flat list of x, y numbers"),
        ([[0, 0, True, 0, 5, 5]], "polygon #0 is not a flat list of x, y numbers"),
        (None, "'segmentation' must be a list of polygons or an RLE"),
        ("0 0 5 0 5 5", "'segmentation' must be a list of polygons or an RLE"),
        ({"size": [10, 10], "counts": [5, 10]}, "RLE counts do not add up to height*width (10x10)"),
        ({"size": [10, 10], "counts": ""}, "RLE counts do not add up"),
        ({"size": [10, 10], "counts": "\xff\xfe"}, "compressed RLE 'counts' string is corrupt"),
        ({"size": [10, 10], "counts": "5d"}, "compressed RLE 'counts' string is corrupt"),  # ends mid-number
        ({"size": [20, 30], "counts": "abc"}, "RLE size [20, 30] differs from the image's 10x10"),
    ],
)
def test_malformed_segmentations(tmp_path, segmentation, expected):
    data = instances()
    data["annotations"][2]["segmentation"] = segmentation  # ann 103, used by ref 2
    root = write_tiny_dataset(tmp_path, instances_data=data)
    with pytest.raises(DataError) as err:
        ReferDataset(root, DATASET)
    assert "annotation 103" in str(err.value) and expected in str(err.value)


def test_rle_string_counts_match_pycocotools():
    from pycocotools import mask as mask_utils

    from refseg.core.refer_files import _rle_string_counts

    rng = np.random.default_rng(0)
    for shape in ((10, 10), (37, 23), (64, 80)):
        m = (rng.random(shape) < 0.4).astype(np.uint8)
        m[:, : shape[1] // 3] = 1  # long runs need several 5-bit groups
        rle = mask_utils.encode(np.asfortranarray(m))
        runs = _rle_string_counts(rle["counts"].decode())
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
        np.testing.assert_array_equal(flat.reshape(shape[::-1]).T, m)


def test_unknown_ref_id(root):
    with pytest.raises(DataError, match="no ref with ref_id 42"):
        ReferDataset(root, DATASET).mask(42)


def test_safe_load_from_path_and_stream(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(refs(), protocol=2))
    assert safe_load(path) == refs()
    assert safe_load(str(path)) == refs()
    with open(path, "rb") as f:
        assert safe_load(f) == refs()
    with pytest.raises(DataError, match="refs file not found"):
        safe_load(tmp_path / "missing.p")
