"""fileio: a file is the old one or the new one, never half of either, and no debris is left."""

import os
import stat

import pytest

from lora_squeeze import fileio


def test_atomic_write_replaces_whole_and_leaves_nothing_beside(tmp_path):
  path = tmp_path / "sub" / "result.json"
  fileio.atomic_write_text(path, "old")
  fileio.atomic_write_text(path, "new ✓")
  assert path.read_text(encoding="utf-8") == "new ✓"
  assert [p.name for p in path.parent.iterdir()] == ["result.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # what open() gives, not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / "table.md"
  path.write_text("old")
  with pytest.raises(RuntimeError, match="disk full"):
    with fileio.atomic_path(path) as tmp:
      tmp.write_text("half")
      raise RuntimeError("disk full")
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_temporary_names_keep_the_suffix_and_differ(tmp_path):
  a, b = fileio.temp_sibling(tmp_path / "plot.png"), fileio.temp_sibling(tmp_path / "plot.png")
  assert a != b and a.suffix == b.suffix == ".png" and a.name.startswith(".plot.") and a.parent == tmp_path
