from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from facekd.errors import DataError
from facekd.io.formats import (IMAGE_EXTENSIONS, LabeledImage, Pair, list_images, read_identity_folder,
                               read_image_list, read_mos_csv, read_pairs, resolve_inputs, write_image_list,
                               write_mos_csv, write_pairs)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- MOS CSV


def test_read_mos_csv_resolves_paths_and_ignores_other_columns(tmp_path):
    touch(tmp_path / "data" / "img" / "a.png")
    other = touch(tmp_path / "elsewhere" / "b.jpg")
    csv_path = write(tmp_path / "data" / "labels.csv",
                     f"id, mos ,path\n1,3.25,img/a.png\n2,-1e-3,{other}\n", bom=True)
    rows = read_mos_csv(csv_path)
    assert rows == [LabeledImage(tmp_path / "data" / "img" / "a.png", 3.25),
                    LabeledImage(other, -0.001)]
    assert all(row.path.is_absolute() for row in rows)


@pytest.mark.parametrize("text, expected", [
    ("", "empty file"),
    ("path,score\na.png,1\n", "header lacks column(s) mos"),
    ("name,mos\na.png,1\n", "header lacks column(s) path"),
    ("path,mos\n", "no rows after the header"),
    ("path,mos\na.png,\n", "line 2: missing mos"),
    ("path,mos\na.png,1\nb.png\n", "line 3: expected 2 fields"),
    ("path,mos\na.png,good\n", "line 2: mos 'good' is not a number"),
    ("path,mos\na.png,1\nb.png,nan\n", "line 3: mos 'nan' is not a finite number"),
    ("path,mos\na.png,inf\n", "line 2: mos 'inf' is not a finite number"),
    ("path,mos\n ,2\n", "line 2: empty path"),
    ("path,mos\na.png,1\n\nsub/../a.png,2\n", "line 4: duplicate path 'sub/../a.png' (first on line 2)"),
    ("path,mos,path\na.png,1,b.png\n", "column 'path' appears twice"),
])
def test_read_mos_csv_errors_name_file_line_and_reason(tmp_path, text, expected):
    csv_path = write(tmp_path / "labels.csv", text)
    with pytest.raises(DataError) as info:
        read_mos_csv(csv_path, check_files=False)
    assert str(csv_path) in str(info.value)
    assert expected in str(info.value)


def test_read_mos_csv_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_mos_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="is a folder"):
        read_mos_csv(tmp_path)


def test_read_mos_csv_non_utf8(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"path,mos\n\xff\xfe.png,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_mos_csv(path, check_files=False)


def test_read_mos_csv_lists_missing_images_with_count(tmp_path):
    touch(tmp_path / "ok.png")
    lines = ["path,mos", "ok.png,1"] + [f"gone{i}.png,{i}" for i in range(7)]
    csv_path = write(tmp_path / "labels.csv", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_mos_csv(csv_path)
    message = str(info.value)
    assert "7 referenced image(s) not found" in message
    assert "line 3:" in message and "gone0.png" in message
    assert "and 2 more" in message
    assert "gone6.png" not in message
    assert len(read_mos_csv(csv_path, check_files=False)) == 8


def test_mos_csv_round_trip_keeps_exact_values_and_relative_paths(tmp_path):
    inside = touch(tmp_path / "set" / "faces" / "a b,c.png")
    outside = touch(tmp_path / "other" / "d.png")
    values = [0.1 + 0.2, 1 / 3]
    csv_path = tmp_path / "set" / "labels.csv"
    write_mos_csv(csv_path, [(inside, values[0]), (outside, values[1])])
    text = csv_path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "path,mos"
    assert '"faces/a b,c.png"' in text  # inside the folder: relative, posix, quoted
    assert outside.as_posix() in text  # outside: absolute
    rows = read_mos_csv(csv_path)
    assert [row.path for row in rows] == [inside, outside]
    assert [row.mos for row in rows] == values  # bit-exact


def test_write_mos_csv_relative_inputs_and_refusals(tmp_path):
    touch(tmp_path / "imgs" / "a.png")
    csv_path = tmp_path / "imgs" / "out.csv"
    write_mos_csv(csv_path, [("a.png", 2)], relative_to=tmp_path / "imgs")
    assert csv_path.read_text().splitlines()[1] == "a.png,2.0"
    before = csv_path.read_bytes()
    with pytest.raises(DataError, match="row 2: mos nan is not a finite number"):
        write_mos_csv(csv_path, [("a.png", 1.0), ("a.png", math.nan)], relative_to=tmp_path / "imgs")
    assert csv_path.read_bytes() == before  # atomic: old file untouched
    assert [p.name for p in (tmp_path / "imgs").iterdir() if p.name.startswith(".")] == []
    with pytest.raises(DataError, match="no rows to write"):
        write_mos_csv(tmp_path / "empty.csv", [])


# --------------------------------------------------------------------------- image lists


def test_image_list_round_trip_with_comments_and_blank_lines(tmp_path):
    a = touch(tmp_path / "lists" / "x" / "a.png")
    b = touch(tmp_path / "b.jpg")
    list_path = write(tmp_path / "lists" / "u.txt", f"# unlabeled\n\nx/a.png\n  {b}  \n")
    assert read_image_list(list_path) == [a, b]
    out = tmp_path / "lists" / "copy.lst"
    write_image_list(out, [a, b])
    assert out.read_text().splitlines() == ["x/a.png", b.as_posix()]
    assert read_image_list(out) == [a, b]


def test_image_list_errors(tmp_path):
    touch(tmp_path / "a.png")
    path = write(tmp_path / "u.txt", "a.png\n# c\nmissing.png\n")
    with pytest.raises(DataError, match=r"1 referenced image\(s\) not found: line 3: .*missing.png"):
        read_image_list(path)
    with pytest.raises(DataError, match="no image paths"):
        read_image_list(write(tmp_path / "empty.txt", "# only a comment\n\n"))
    with pytest.raises(DataError, match="not found"):
        read_image_list(tmp_path / "absent.txt")
    with pytest.raises(DataError, match="cannot be stored"):
        write_image_list(tmp_path / "bad.txt", [tmp_path / "line\nbreak.png"])
    assert not (tmp_path / "bad.txt").exists()


# --------------------------------------------------------------------------- folders


def test_list_images_sorted_filtered_and_hidden_skipped(tmp_path):
    for name in ["b.PNG", "a.jpg", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", ".hidden.png",
                 ".cache/e.png", "a.jpgx"]:
        touch(tmp_path / name)
    found = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.tiff"]
    flat = list_images(tmp_path, recursive=False)
    assert [p.name for p in flat] == ["a.jpg", "b.PNG"]


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "empty" / "readme.md")
    with pytest.raises(DataError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="folder not found"):
        list_images(tmp_path / "absent")
    with pytest.raises(DataError, match="not a folder"):
        list_images(tmp_path / "empty" / "readme.md")


def test_image_extensions_are_lowercase_dotted():
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert ".png" in IMAGE_EXTENSIONS and ".jpg" in IMAGE_EXTENSIONS


def test_resolve_inputs_mixes_files_lists_and_folders_without_duplicates(tmp_path):
    a = touch(tmp_path / "dir" / "a.png")
    b = touch(tmp_path / "dir" / "b.png")
    c = touch(tmp_path / "c.jpg")
    listing = write(tmp_path / "more.lst", "c.jpg\ndir/a.png\n")
    result = resolve_inputs([str(b), tmp_path / "dir", listing, c])
    assert result == [b, a, c]
    with pytest.raises(DataError, match="not an image"):
        resolve_inputs([touch(tmp_path / "model.onnx")])
    with pytest.raises(DataError, match="not found"):
        resolve_inputs([tmp_path / "absent.png"])
    with pytest.raises(DataError, match="no image paths"):
        resolve_inputs([])


def test_resolve_inputs_relative_item_comes_back_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs(["a.png", "./a.png"]) == [tmp_path / "a.png"]


# --------------------------------------------------------------------------- identity folders


def test_read_identity_folder(tmp_path):
    for name in ["bob/2.jpg", "bob/1.jpg", "alice/x.png", "alice/more/y.png", "carol/notes.txt",
                 ".trash/z.png", "loose.png"]:
        touch(tmp_path / name)
    (tmp_path / "dave").mkdir()
    data = read_identity_folder(tmp_path)
    assert data.class_names == ["alice", "bob"]
    assert data.skipped_empty == ["carol", "dave"]
    assert [p.relative_to(tmp_path).as_posix() for p in data.paths] == [
        "alice/more/y.png", "alice/x.png", "bob/1.jpg", "bob/2.jpg"]
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert len(data) == 4 and data.num_classes == 2


def test_read_identity_folder_without_identities(tmp_path):
    touch(tmp_path / "a.png")
    (tmp_path / "empty_id").mkdir()
    with pytest.raises(DataError) as info:
        read_identity_folder(tmp_path)
    assert "no identity folders" in str(info.value)
    assert "1 image(s) lie directly in it" in str(info.value)
    assert "1 empty identity folder(s)" in str(info.value)


# --------------------------------------------------------------------------- pairs


def test_read_pairs_separators_and_relative_paths(tmp_path):
    for name in ["p/a.png", "p/b.png", "p/with space.png", "p/c,d.png"]:
        touch(tmp_path / name)
    path = write(tmp_path / "p" / "pairs.txt",
                 "# header\n"
                 "a.png b.png 1\n"
                 "a.png\tb.png\t0\n"
                 "with space.png , a.png , 1\n"
                 "with space.png\tc,d.png\t0\n"
                 "c,d.png b.png 1\n")
    pairs = read_pairs(path)
    p = tmp_path / "p"
    assert pairs == [Pair(p / "a.png", p / "b.png", True),
                     Pair(p / "a.png", p / "b.png", False),
                     Pair(p / "with space.png", p / "a.png", True),
                     Pair(p / "with space.png", p / "c,d.png", False),
                     Pair(p / "c,d.png", p / "b.png", True)]


@pytest.mark.parametrize("line, expected", [
    ("a.png b.png", "line 2: expected 3 fields"),
    ("a.png b.png c.png 1", "line 2: expected 3 fields"),
    ("a.png b.png yes", "line 2: same must be 0 or 1, got 'yes'"),
    ("a.png b.png 2", "same must be 0 or 1"),
    ("a.png,,1", "line 2: empty path"),
])
def test_read_pairs_line_errors(tmp_path, line, expected):
    path = write(tmp_path / "pairs.txt", f"a.png b.png 1\n{line}\n")
    with pytest.raises(DataError) as info:
        read_pairs(path, check_files=False)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_read_pairs_missing_files_and_empty(tmp_path):
    touch(tmp_path / "a.png")
    path = write(tmp_path / "pairs.txt", "a.png a.png 1\na.png gone.png 0\n")
    with pytest.raises(DataError, match=r"line 2: .*gone\.png"):
        read_pairs(path)
    assert len(read_pairs(path, check_files=False)) == 2
    with pytest.raises(DataError, match="no pairs"):
        read_pairs(write(tmp_path / "empty.txt", "\n# nothing\n"))


def test_write_pairs_space_then_tab_separated(tmp_path):
    a = touch(tmp_path / "a.png")
    b = touch(tmp_path / "b.png")
    spaced = touch(tmp_path / "s p.png")
    plain_path = tmp_path / "plain.txt"
    write_pairs(plain_path, [Pair(a, b, True), (a, b, 0)])
    assert plain_path.read_text().splitlines() == ["a.png b.png 1", "a.png b.png 0"]
    tabbed_path = tmp_path / "tabbed.txt"
    pairs = [Pair(a, b, False), Pair(spaced, a, True)]
    write_pairs(tabbed_path, pairs)
    assert tabbed_path.read_text().splitlines() == ["a.png\tb.png\t0", "s p.png\ta.png\t1"]
    assert read_pairs(tabbed_path) == pairs


def test_write_pairs_refuses_unstorable_paths(tmp_path):
    out = tmp_path / "pairs.txt"
    with pytest.raises(DataError, match="cannot be stored in a pairs file"):
        write_pairs(out, [(tmp_path / "a\tb.png", tmp_path / "c.png", True)])
    with pytest.raises(DataError, match="no pairs to write"):
        write_pairs(out, [])
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_special_files_are_refused_without_reading(tmp_path):
    import os

    from facekd.errors import DataError
    from facekd.io.formats import read_mos_csv

    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="labels.csv: is not a regular file"):
        read_mos_csv(fifo)


# --------------------------------------------------------------------------- MOS CSV weights


def test_mos_csv_weight_column_round_trip_and_default(tmp_path):
    a, b = touch(tmp_path / "a.png"), touch(tmp_path / "b.png")
    csv_path = tmp_path / "pseudo.csv"
    write_mos_csv(csv_path, [(a, 2.5, 0.125), LabeledImage(b, 1.0, 1.0)])
    assert csv_path.read_text().splitlines() == ["path,mos,weight", "a.png,2.5,0.125", "b.png,1.0,1.0"]
    assert read_mos_csv(csv_path) == [LabeledImage(a, 2.5, 0.125), LabeledImage(b, 1.0)]
    assert [r.weight for r in read_mos_csv(csv_path, weight_column=None)] == [1.0, 1.0]
    # all weights 1: no weight column unless asked for
    write_mos_csv(csv_path, [(a, 2.5), (b, 1.0, 1.0)])
    assert csv_path.read_text().splitlines()[0] == "path,mos"
    write_mos_csv(csv_path, [(a, 2.5)], weight_column=True)
    assert csv_path.read_text().splitlines() == ["path,mos,weight", "a.png,2.5,1.0"]
    # another column name
    write(csv_path, "path,mos,conf\na.png,1,0.5\n")
    assert read_mos_csv(csv_path, weight_column="conf")[0].weight == 0.5
    assert read_mos_csv(csv_path)[0].weight == 1.0


@pytest.mark.parametrize("text, expected", [
    ("path,mos,weight\na.png,1,\n", "line 2: missing weight"),
    ("path,mos,weight\na.png,1,heavy\n", "line 2: weight 'heavy' is not a number"),
    ("path,mos,weight\na.png,1,-0.5\n", "line 2: weight '-0.5' must be a finite number >= 0"),
    ("path,mos,weight\na.png,1,nan\n", "line 2: weight 'nan' must be a finite number >= 0"),
    ("path,mos,weight\na.png,1\n", "line 2: expected 3 fields, got 2"),
    ("path,mos,weight,weight\na.png,1,1,1\n", "column 'weight' appears twice"),
])
def test_read_mos_csv_weight_errors(tmp_path, text, expected):
    csv_path = write(tmp_path / "labels.csv", text)
    with pytest.raises(DataError) as info:
        read_mos_csv(csv_path, check_files=False)
    assert str(csv_path) in str(info.value) and expected in str(info.value)


def test_write_mos_csv_refuses_bad_or_lost_weights(tmp_path):
    a = touch(tmp_path / "a.png")
    with pytest.raises(DataError, match="row 2: weight -1.0 must be >= 0"):
        write_mos_csv(tmp_path / "w.csv", [(a, 1.0), (a, 1.0, -1.0)])
    with pytest.raises(DataError, match="row 1: weight inf is not a finite number"):
        write_mos_csv(tmp_path / "w.csv", [(a, 1.0, math.inf)])
    with pytest.raises(DataError, match="row 1: weight 0.5 would be lost"):
        write_mos_csv(tmp_path / "w.csv", [(a, 1.0, 0.5)], weight_column=False)
    with pytest.raises(DataError, match=r"row 1: expected \(path, mos\)"):
        write_mos_csv(tmp_path / "w.csv", [(a,)])
    assert not (tmp_path / "w.csv").exists()


def test_resolve_inputs_can_leave_missing_files_to_the_caller(tmp_path):
    a = touch(tmp_path / "a.png")
    listing = write(tmp_path / "l.txt", "a.png\ngone.png\n")
    with pytest.raises(DataError, match="1 referenced image"):
        resolve_inputs([listing])
    assert resolve_inputs([listing, tmp_path / "other.jpg"], check_files=False) == [
        a, tmp_path / "gone.png", tmp_path / "other.jpg"]
    with pytest.raises(DataError, match="not found"):  # not an image path: still refused
        resolve_inputs([tmp_path / "nowhere"], check_files=False)
