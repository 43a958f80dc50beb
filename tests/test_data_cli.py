"""`refseg-data synth` / `info`, and one-line errors with exit 2."""

import pickle

from _cli_util import one_line_error as _one_line_error
from click.testing import CliRunner

from refseg.core.data_cli import main
from refseg.core.refer import ReferDataset


def _table(output):
    """split name → (refs, sentences, images) from the printed table."""
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1].isdigit():
            rows[parts[0]] = tuple(int(v) for v in parts[1:])
    return rows


def test_synth_then_info(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--out", str(tmp_path), "--images", "40"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "refcoco-synth" / "refs(unc).p").is_file()
    assert len(list((tmp_path / "refcoco-synth" / "images").glob("*.jpg"))) == 40

    result = runner.invoke(main, ["info", "--data-root", str(tmp_path), "--dataset", "refcoco-synth"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split() == ["split", "refs", "sentences", "images"]
    rows = _table(result.output)
    assert list(rows) == ["train", "val", "testA", "testB", "total"]
    expected = ReferDataset(tmp_path, "refcoco-synth").splits()
    for name, counts in expected.items():
        assert rows[name] == (counts["refs"], counts["sentences"], counts["images"])
    assert rows["total"] == (sum(r[0] for n, r in rows.items() if n != "total"),
                             sum(r[1] for n, r in rows.items() if n != "total"), 40)
    assert rows["val"][2] == rows["testA"][2] == rows["testB"][2] == 4


def test_synth_options_are_checked(tmp_path):
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), "--images", "0"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), "--image-size", "8"])
    assert result.exit_code == 2



def test_missing_data_root(tmp_path):
    result = CliRunner().invoke(main, ["info", "--data-root", str(tmp_path / "nope"), "--dataset", "refcoco"])
    _one_line_error(result, "data root not found", str(tmp_path / "nope"))


def test_malformed_files_exit_2(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["synth", "--out", str(tmp_path), "--images", "8"]).exit_code == 0
    args = ["info", "--data-root", str(tmp_path), "--dataset", "refcoco-synth"]
    refs_path = tmp_path / "refcoco-synth" / "refs(unc).p"
    good = refs_path.read_bytes()

    refs_path.write_bytes(good[:-40])
    _one_line_error(runner.invoke(main, args), "malformed pickle", str(refs_path))

    refs = pickle.loads(good)
    refs[0]["ann_id"] = 123456
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    _one_line_error(runner.invoke(main, args), "ann_id 123456")

    refs_path.write_bytes(pickle.dumps([{"x": print}], protocol=2))
    # protocol 2 writes Python 2 module names
    _one_line_error(runner.invoke(main, args), "refusing to unpickle", "__builtin__.print")

    refs_path.write_bytes(good)
    (tmp_path / "refcoco-synth" / "instances.json").write_text('{"images": [')
    _one_line_error(runner.invoke(main, args), "malformed JSON in")

    _one_line_error(runner.invoke(main, args[:-1] + ["refcoco-synth", "--split-by", "google"]),
                    "refs file not found", "refs(google).p")
