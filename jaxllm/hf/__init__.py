"""Hugging Face interop: safetensors in and out, streamed into the mesh."""
