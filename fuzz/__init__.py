"""Fuzz targets: `fuzz/fuzz_<name>.py`, each with `one_input(data: bytes) -> None` that
raises only on a real finding (run under atheris by the project's fuzz runner)."""
