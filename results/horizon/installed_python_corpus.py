"""Writes one UTF-8 text file of the .py files this Python has, its standard library and its installed
packages, for `sweep.py --data` (and `DATA=` of the scripts beside this one): a corpus large enough that
the horizon preset's pretraining (1,800 x 32 x 1,024 bytes) sees each part of it at most once. The GPU
machine's standard library alone, the default corpus, is 10.7 MB, which that pretraining passes over
about six times; its installed packages hold far more Python.

The files go in the order of the CRC32 of their path below their root, so that data.load_corpus's split
of one file by position (the last 5 % for validation) takes a spread of files, not the last package.
Files that are not UTF-8 or are empty are left out, and so is a file whose bytes an earlier one had (a
package installed twice, a file copied between packages), so that no validation text is also training
text. (Revision dbf8db5's version kept such copies: 1.0 % of the bytes on the GPU machine, whose
results/horizon/horizon_h200_pycorpus runs read it.)

    python results/horizon/installed_python_corpus.py OUT.txt
"""
import hashlib
import os
import site
import sys
import sysconfig
import zlib


def source_files() -> list[tuple[str, str]]:
    """(path below its root, real path) of every .py file under the standard library and site
    directories, each once, in the order of the CRC32 of the first (then the path itself)."""
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(r) for r in (paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages())
             if os.path.isdir(r)}
    found = {}
    for root in sorted(roots):
        for directory, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in files:
                real = os.path.realpath(os.path.join(directory, f))
                if f.endswith(".py") and real not in found:
                    found[real] = os.path.relpath(os.path.join(directory, f), root)
    return sorted(((rel, real) for real, rel in found.items()), key=lambda x: (zlib.crc32(x[0].encode()), x[0]))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python results/horizon/installed_python_corpus.py OUT.txt")
    out, seen, count, size = sys.argv[1], set(), 0, 0
    try:
        with open(out + ".part", "wb") as w:
            for _, path in source_files():
                try:
                    with open(path, "rb") as f:
                        text = f.read()
                    text.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                digest = hashlib.sha256(text).digest()
                if text and digest not in seen:
                    seen.add(digest)
                    w.write(text + b"\n")
                    count, size = count + 1, size + len(text) + 1
        os.replace(out + ".part", out)
    except OSError as e:
        sys.exit(f"cannot write {out}: {e.strerror}")
    finally:
        if os.path.exists(out + ".part"):
            os.remove(out + ".part")
    print(f"{out}: {count:,} files, {size:,} bytes (train.py and sweep.py print and keep its SHA-256)")


if __name__ == "__main__":
    main()
