"""``fs.write_error``: what a writer's failure means, as an OSError naming the file written."""

import errno

from safetensors import SafetensorError

from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write, write_error


def test_rust_io_errors_in_both_spellings_become_that_os_error():
    debug = SafetensorError('IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    shown = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    for exc, code in ((debug, errno.ENOSPC), (shown, errno.EFBIG)):
        got = write_error(exc, "out/model.safetensors")
        assert isinstance(got, OSError) and got.errno == code
        assert got.filename == "out/model.safetensors"


def test_other_errors_are_left_as_they_are():
    own = CompactnnError("cannot read x (os error 2)")
    assert write_error(own, "p") is own
    bug = ValueError("bad value")
    assert write_error(bug, "p") is bug
    named = OSError(errno.ENOSPC, "No space left on device", "elsewhere")
    assert write_error(named, "p") is named


def test_atomic_write_names_the_target_not_its_temporary_file(tmp_path):
    def fail(tmp):
        raise OSError(errno.EACCES, "Permission denied", tmp)

    target = tmp_path / "m.bin"
    try:
        atomic_write(target, fail)
    except OSError as exc:
        assert exc.filename == str(target) and exc.errno == errno.EACCES
    else:
        raise AssertionError("no error")
    assert list(tmp_path.iterdir()) == []
