"""Checkpoint importers: Hugging Face folders, GGUF files and named presets.

Every importer returns a ``LoadedCheckpoint`` whose ``weights`` are float
numpy arrays under Hugging Face Llama names and layouts (float32 from GGUF,
the stored dtype from safetensors; see ``hf_folder``).
"""
from recursive_lm.checkpoints.gguf_file import (
    config_from_gguf, gguf_metadata, gguf_to_hf_name, load_gguf, permute_qk,
    reverse_permute_qk, tokenizer_from_gguf)
from recursive_lm.checkpoints.hf_folder import (
    CheckpointError, LoadedCheckpoint, expected_shapes, load_hf_folder,
    read_safetensors, validate_weights, weights_to_device)
from recursive_lm.checkpoints.presets import (
    DEFAULT_PRESET, load_checkpoint, preset_names, resolve_preset)

__all__ = [
    "CheckpointError", "DEFAULT_PRESET", "LoadedCheckpoint", "config_from_gguf",
    "expected_shapes", "gguf_metadata", "gguf_to_hf_name", "load_checkpoint",
    "load_gguf", "load_hf_folder", "permute_qk", "preset_names",
    "read_safetensors", "resolve_preset", "reverse_permute_qk",
    "tokenizer_from_gguf", "validate_weights", "weights_to_device",
]
