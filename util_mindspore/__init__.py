"""MindSpore utilities for RETFound (mirrors the original's util/ package)."""
