from .io import atomic_path, write_json, write_text

__all__ = ["atomic_path", "write_json", "write_text"]
