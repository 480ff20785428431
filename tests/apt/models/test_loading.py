"""The offline short names: each resolves to the published model it stands for, from a PyPI package."""

from pathlib import Path

from apt.models.loading import SHORT_NAMES, resolve_model


def test_gemma3_is_joined_once_from_its_four_chunk_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("APT_SPARSE_CACHE", str(tmp_path))
    source = resolve_model("gemma3-270m")
    gguf = Path(source.location) / source.gguf_file
    assert source.origin == "google/gemma-3-270m" and gguf.parent == tmp_path / "gguf-sources"
    assert gguf.stat().st_size == 253_113_024 and not list(gguf.parent.glob("*.part"))  # the package checks sha256
    mtime = gguf.stat().st_mtime_ns
    assert resolve_model("gemma3-270m").gguf_file == source.gguf_file and gguf.stat().st_mtime_ns == mtime


def test_every_short_name_names_its_origin_on_the_hub():
    assert {name: origin for name, (_, origin) in SHORT_NAMES.items()} == {
        "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
        "gemma3-270m": "google/gemma-3-270m",
    }
