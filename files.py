"""
Files written whole or not at all, and JSON read with the file named in any error: a killed run never
leaves half a checkpoint, and a bad file says which it is.
"""
import json
import os
import tempfile


def atomic_write(path, write):
    """write(tmp_path) then rename over path, so a killed process never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path, error=ValueError):
    """The JSON in path; a missing file is FileNotFoundError, a malformed one `error` (the caller's
    DataError or CheckpointError), each naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise error(f"{path}: not valid JSON ({e})") from None
