"""Launching SGLang from a profile and managing its processes."""
