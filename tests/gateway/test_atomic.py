import os
import stat

import pytest

from gateway.atomic import replaced_file


def test_the_new_contents_replace_the_file_only_at_the_end(tmp_path):
    path = tmp_path / "sub" / "model.bin"
    with replaced_file(str(path)) as f:
        f.write(b"first")
    with replaced_file(str(path)) as f:
        f.write(b"second")
        assert path.read_bytes() == b"first"  # a reader meanwhile sees the old file
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["model.bin"]


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "users"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with replaced_file(str(path), "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("disk trouble")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["users"]


def test_permissions_are_set_before_the_file_appears(tmp_path):
    path = tmp_path / "users"
    with replaced_file(str(path), "w", permissions=0o600, encoding="utf-8") as f:
        f.write("alice:admin:x\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
